//! In-database tests (`cargo pgrx test pg15`): behaviour of one server with pg_sharding loaded.
//! Each test runs in a transaction that is rolled back. Behaviour that needs workers is tested
//! by the multi-node suite in tests/multinode.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn sqlstate_of(sql: &str) -> Option<String> {
        PgTryBuilder::new(|| {
            Spi::run(sql).expect("statement failed outside of ereport");
            None
        })
        .catch_others(|error| match error {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(report) => {
                Some(format!("{:?}", report.sql_error_code()))
            }
            pgrx::pg_sys::panic::CaughtError::RustPanic { .. } => Some("rust panic".to_string()),
        })
        .execute()
    }

    #[pg_test]
    fn catalog_starts_empty() {
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sharding.nodes").unwrap(), Some(0));
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM sharding.node_health()").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn unreachable_node_is_refused_and_not_recorded() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let code = sqlstate_of("SELECT sharding.add_node('127.0.0.1', 1)");
        assert_eq!(code.as_deref(), Some("ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION"));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sharding.dist_node").unwrap(), Some(0));
    }

    #[pg_test]
    fn bad_arguments_have_sqlstates() {
        assert_eq!(
            sqlstate_of("SELECT sharding.add_node('127.0.0.1', 70000)").as_deref(),
            Some("ERRCODE_INVALID_PARAMETER_VALUE")
        );
        assert_eq!(
            sqlstate_of("SELECT sharding.add_node('', 5432)").as_deref(),
            Some("ERRCODE_INVALID_PARAMETER_VALUE")
        );
        assert_eq!(
            sqlstate_of("SELECT sharding.add_node(NULL, 5432)").as_deref(),
            Some("ERRCODE_NULL_VALUE_NOT_ALLOWED")
        );
        assert_eq!(
            sqlstate_of("SELECT sharding.remove_node('127.0.0.1', 5999)").as_deref(),
            Some("ERRCODE_UNDEFINED_OBJECT")
        );
    }

    #[pg_test]
    fn this_server_registers_as_the_coordinator_node() {
        let port = Spi::get_one::<String>("SELECT current_setting('port')").unwrap().unwrap();
        Spi::run(&format!("SELECT sharding.add_node('127.0.0.1', {port})")).unwrap();
        let flag = Spi::get_one::<bool>(&format!("SELECT is_coordinator FROM sharding.nodes WHERE port = {port}")).unwrap();
        assert_eq!(flag, Some(true));
        // Once only, also under another name.
        let code = sqlstate_of(&format!("SELECT sharding.add_node('localhost', {port})"));
        assert_eq!(code.as_deref(), Some("ERRCODE_DUPLICATE_OBJECT"));
    }

    #[pg_test]
    fn catalog_is_read_only_for_ordinary_roles() {
        Spi::run("CREATE ROLE sharding_test_user").unwrap();
        Spi::run("SET LOCAL ROLE sharding_test_user").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM sharding.nodes").unwrap(), Some(0));
        assert_eq!(
            sqlstate_of("INSERT INTO sharding.dist_node (node_id, host, port) VALUES (1, 'x', 1)")
                .as_deref(),
            Some("ERRCODE_INSUFFICIENT_PRIVILEGE")
        );
        assert_eq!(
            sqlstate_of("SELECT sharding.add_node('127.0.0.1', 1)").as_deref(),
            Some("ERRCODE_INSUFFICIENT_PRIVILEGE")
        );
    }

    #[pg_test]
    fn metadata_cache_is_reused_and_invalidated_by_catalog_changes() {
        let loads = || Spi::get_one::<i64>("SELECT sharding.metadata_cache_loads()").unwrap().unwrap();
        Spi::run("SELECT count(*) FROM sharding.node_health()").unwrap();
        let first = loads();
        Spi::run("SELECT count(*) FROM sharding.node_health()").unwrap();
        Spi::run("SELECT count(*) FROM sharding.node_health()").unwrap();
        assert_eq!(loads(), first, "the cache must not be re-read per statement");

        // A row written straight into the catalog (as superuser) must be seen at the next statement.
        Spi::run(
            "INSERT INTO sharding.dist_node (node_id, host, port) VALUES (999, '127.0.0.1', 1)",
        )
        .unwrap();
        let seen = Spi::get_one::<i64>(
            "SELECT count(*) FROM sharding.node_health() WHERE node_id = 999 AND NOT reachable",
        )
        .unwrap();
        assert_eq!(seen, Some(1));
        assert_eq!(loads(), first + 1);
    }

    #[pg_test]
    fn settings_have_defaults_and_a_reserved_prefix() {
        assert_eq!(
            Spi::get_one::<String>("SELECT current_setting('sharding.shard_count')").unwrap().as_deref(),
            Some("32")
        );
        assert_eq!(
            sqlstate_of("SET sharding.no_such_setting = 1").as_deref(),
            Some("ERRCODE_INVALID_NAME")
        );
    }

    #[pg_test]
    fn hash_value_matches_the_frozen_vectors() {
        // The same numbers as crates/core/src/hash.rs test_vectors, seen through SQL.
        let check = |sql: &str, expected: i32| {
            assert_eq!(Spi::get_one::<i32>(sql).unwrap(), Some(expected), "{sql}");
        };
        check("SELECT sharding.hash_value(1)", 669250676);
        check("SELECT sharding.hash_value(-1::bigint)", -1250303379);
        check("SELECT sharding.hash_value(3.14)", 1895156961);
        check("SELECT sharding.hash_value('hello'::text)", 453092627);
        check("SELECT sharding.hash_value('hello'::bytea)", 973435286);
        check("SELECT sharding.hash_value('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)", 526515886);
        check("SELECT sharding.hash_value('2000-01-01'::date)", -2128052022);
        check("SELECT sharding.hash_value('2000-01-01 00:00:00'::timestamp)", 124667315);
        check("SELECT sharding.hash_value('2000-01-01 00:00:00+00'::timestamptz)", 124667315);
    }

    #[pg_test]
    fn equal_values_hash_equally_across_types() {
        let same = |sql: &str| assert_eq!(Spi::get_one::<bool>(sql).unwrap(), Some(true), "{sql}");
        same("SELECT sharding.hash_value(42::int2) = sharding.hash_value(42::int4) AND sharding.hash_value(42::int4) = sharding.hash_value(42::int8)");
        same("SELECT sharding.hash_value(42::int8) = sharding.hash_value(42.000::numeric)");
        same("SELECT sharding.hash_value(1.0::numeric) = sharding.hash_value(1.00::numeric)");
        same("SELECT sharding.hash_value('abc'::text) = sharding.hash_value('abc'::varchar)");
        same("SELECT sharding.hash_value('abc'::char(6)) = sharding.hash_value('abc'::text)");
        same("SELECT sharding.hash_value(repeat('x', 5000)) = sharding.hash_value(repeat('x', 5000)::varchar)");
        same("SELECT sharding.hash_value(1) <> sharding.hash_value(2)");
        same("SELECT sharding.hash_value(NULL::int) IS NULL");
    }

    #[pg_test]
    fn unsupported_types_cannot_be_hashed() {
        assert_eq!(
            sqlstate_of("SELECT sharding.hash_value('{}'::jsonb)").as_deref(),
            Some("ERRCODE_FEATURE_NOT_SUPPORTED")
        );
    }

    #[pg_test]
    fn metadata_reads_leave_the_transaction_read_only() {
        // Read through read-only SPI ourselves: Spi::run would assign a transaction id itself.
        let assigned = Spi::connect(|client| {
            client.select("SELECT count(*) FROM sharding.node_health()", None, &[]).unwrap();
            client
                .select("SELECT pg_catalog.txid_current_if_assigned()", None, &[])
                .unwrap()
                .first()
                .get_one::<i64>()
                .unwrap()
        });
        assert_eq!(assigned, None, "reading the catalog must not assign a transaction id");
    }
}
