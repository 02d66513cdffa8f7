//! A table's definition read from the catalog (the data types and the shard DDL rendering
//! live in crates/core/src/table_def.rs).
//!
//! Every expression comes from PostgreSQL's ruleutils (format_type, pg_get_expr,
//! pg_get_constraintdef, pg_get_indexdef per column) and every name from quote_ident, so the
//! shard DDL is assembled from deparsed pieces, never by editing SQL text.

use pgrx::prelude::*;

use crate::error::{Result, ShardingError};

pub use sharding_core::foreign_key::ForeignKey;
pub use sharding_core::table_def::{shard_object_name, Column, Constraint, Index, TableDefinition};

const COLUMNS_QUERY: &str = "
SELECT a.attnum, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.atttypid,
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN
           (SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.collname)
              FROM pg_catalog.pg_collation c JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace
             WHERE c.oid = a.attcollation) END,
       pg_catalog.pg_get_expr(d.adbin, d.adrelid),
       a.attgenerated::text, a.attidentity::text,
       EXISTS (SELECT 1 FROM pg_catalog.pg_depend dep
                WHERE dep.classid = 'pg_catalog.pg_attrdef'::regclass AND dep.objid = d.oid
                  AND dep.refclassid = 'pg_catalog.pg_class'::regclass
                  AND dep.refobjid <> a.attrelid)
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum";

const CONSTRAINTS_QUERY: &str = "
SELECT c.conname::text, c.contype::text, pg_catalog.pg_get_constraintdef(c.oid, false),
       COALESCE(c.conkey, '{}')::int2[]
  FROM pg_catalog.pg_constraint c
 WHERE c.conrelid = $1
 ORDER BY c.contype, c.conname";

const INDEXES_QUERY: &str = "
SELECT ic.relname::text, i.indisunique, i.indnullsnotdistinct, am.amname::text,
       i.indnkeyatts::int4, i.indkey::int2[], i.indoption::int2[],
       pg_catalog.pg_get_expr(i.indpred, i.indrelid),
       ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, k, false)
               FROM generate_series(1, i.indnatts) k ORDER BY k),
       ARRAY(SELECT COALESCE((SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(oc.opcname)
                                FROM pg_catalog.pg_opclass oc JOIN pg_catalog.pg_namespace n ON n.oid = oc.opcnamespace
                               WHERE oc.oid = u.opc), '')
               FROM unnest(i.indclass::oid[]) WITH ORDINALITY u(opc, ord) ORDER BY ord),
       ARRAY(SELECT COALESCE((SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                                FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace n ON n.oid = co.collnamespace
                               WHERE co.oid = u.coll), '')
               FROM unnest(i.indcollation::oid[]) WITH ORDINALITY u(coll, ord) ORDER BY ord),
       pg_catalog.pg_indexam_has_property(am.oid, 'can_order')
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_catalog.pg_am am ON am.oid = ic.relam
 WHERE i.indrelid = $1
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)
 ORDER BY ic.relname";

/// Reads the definition of `relid` from the catalog.
pub fn read(relid: pg_sys::Oid) -> Result<TableDefinition> {
    let (schema, name) = crate::catalog::read_two::<String, String>(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )?;
    let (Some(schema), Some(name)) = (schema, name) else {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
        ));
    };
    Spi::connect(|client| {
        let mut columns = Vec::new();
        for row in client.select(COLUMNS_QUERY, None, &[relid.into()])? {
            let default: Option<String> = row.get(7)?;
            let generated = row.get::<String>(8)?.unwrap_or_default();
            let identity = row.get::<String>(9)?.unwrap_or_default();
            let uses_relation = row.get::<bool>(10)?.unwrap_or(false);
            let is_generated = generated == "s";
            let coordinator_default = !identity.is_empty() || (default.is_some() && uses_relation && !is_generated);
            columns.push(Column {
                attnum: row.get::<i16>(1)?.unwrap_or_default(),
                name: row.get::<String>(2)?.unwrap_or_default(),
                type_sql: row.get::<String>(3)?.unwrap_or_default(),
                not_null: row.get::<bool>(4)?.unwrap_or(false),
                type_oid: row.get::<pg_sys::Oid>(5)?.unwrap_or(pg_sys::InvalidOid).to_u32(),
                collation_sql: row.get::<String>(6)?,
                shard_default: if is_generated || coordinator_default { None } else { default.clone() },
                coordinator_default,
                generated_sql: if is_generated { default } else { None },
            });
        }
        let mut constraints = Vec::new();
        for row in client.select(CONSTRAINTS_QUERY, None, &[relid.into()])? {
            constraints.push(Constraint {
                name: row.get::<String>(1)?.unwrap_or_default(),
                kind: row.get::<String>(2)?.unwrap_or_default().chars().next().unwrap_or('?'),
                definition: row.get::<String>(3)?.unwrap_or_default(),
                columns: row.get::<Vec<i16>>(4)?.unwrap_or_default(),
            });
        }
        let mut indexes = Vec::new();
        for row in client.select(INDEXES_QUERY, None, &[relid.into()])? {
            let key_count = row.get::<i32>(5)?.unwrap_or_default().max(0) as usize;
            let keys = row.get::<Vec<i16>>(6)?.unwrap_or_default();
            let options = row.get::<Vec<i16>>(7)?.unwrap_or_default();
            let definitions = row.get::<Vec<String>>(9)?.unwrap_or_default();
            let opclasses = row.get::<Vec<String>>(10)?.unwrap_or_default();
            let collations = row.get::<Vec<String>>(11)?.unwrap_or_default();
            // ASC/DESC and NULLS FIRST/LAST exist for ordered access methods (btree) only.
            let ordered = row.get::<bool>(12)?.unwrap_or(false);
            let elements = definitions
                .iter()
                .enumerate()
                .map(|(i, definition)| {
                    let is_expression = keys.get(i).copied().unwrap_or(0) == 0;
                    let mut element =
                        if is_expression { format!("({definition})") } else { definition.clone() };
                    if i < key_count {
                        if let Some(collation) = collations.get(i).filter(|c| !c.is_empty()) {
                            element.push_str(&format!(" COLLATE {collation}"));
                        }
                        if let Some(opclass) = opclasses.get(i).filter(|c| !c.is_empty()) {
                            element.push_str(&format!(" {opclass}"));
                        }
                        if ordered {
                            let option = options.get(i).copied().unwrap_or(0);
                            element.push_str(if option & 1 != 0 { " DESC" } else { " ASC" });
                            element.push_str(if option & 2 != 0 { " NULLS FIRST" } else { " NULLS LAST" });
                        }
                    }
                    element
                })
                .collect();
            indexes.push(Index {
                name: row.get::<String>(1)?.unwrap_or_default(),
                unique: row.get::<bool>(2)?.unwrap_or(false),
                nulls_not_distinct: row.get::<bool>(3)?.unwrap_or(false),
                method: row.get::<String>(4)?.unwrap_or_default(),
                key_count,
                elements,
                predicate: row.get::<String>(8)?,
                columns: keys,
            });
        }
        Ok(TableDefinition { schema, name, columns, constraints, indexes })
    })
}


const FOREIGN_KEYS_QUERY: &str = "
SELECT c.conname::text, c.confrelid, rn.nspname::text, rc.relname::text,
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
       c.conkey,
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i),
       c.confkey, c.confmatchtype::text, c.confupdtype::text, c.confdeltype::text,
       COALESCE(c.confdelsetcols, '{}')::int2[], c.condeferrable, c.condeferred, c.convalidated
  FROM pg_catalog.pg_constraint c
  JOIN pg_catalog.pg_class rc ON rc.oid = c.confrelid
  JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
 WHERE c.contype = 'f' AND c.conrelid = $1
 ORDER BY c.conname";

/// The foreign keys of `relid` (the keys it holds, referencing other tables or itself).
pub fn foreign_keys(relid: pg_sys::Oid) -> Result<Vec<ForeignKey>> {
    let code = |value: Option<String>| value.and_then(|v| v.chars().next()).unwrap_or('a');
    Spi::connect(|client| {
        let mut keys = Vec::new();
        for row in client.select(FOREIGN_KEYS_QUERY, None, &[relid.into()])? {
            keys.push(ForeignKey {
                name: row.get::<String>(1)?.unwrap_or_default(),
                referenced_relid: row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid).to_u32(),
                referenced_schema: row.get::<String>(3)?.unwrap_or_default(),
                referenced_name: row.get::<String>(4)?.unwrap_or_default(),
                columns: row.get::<Vec<String>>(5)?.unwrap_or_default(),
                attnums: row.get::<Vec<i16>>(6)?.unwrap_or_default(),
                referenced_columns: row.get::<Vec<String>>(7)?.unwrap_or_default(),
                referenced_attnums: row.get::<Vec<i16>>(8)?.unwrap_or_default(),
                match_type: code(row.get::<String>(9)?),
                on_update: code(row.get::<String>(10)?),
                on_delete: code(row.get::<String>(11)?),
                delete_set_columns: row.get::<Vec<i16>>(12)?.unwrap_or_default(),
                deferrable: row.get::<bool>(13)?.unwrap_or(false),
                deferred: row.get::<bool>(14)?.unwrap_or(false),
                validated: row.get::<bool>(15)?.unwrap_or(true),
            });
        }
        Ok(keys)
    })
}

/// The other tables whose foreign keys reference `relid`: (table, key name) each.
pub fn referencing_tables(relid: pg_sys::Oid) -> Result<Vec<(pg_sys::Oid, String)>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT conrelid, conname::text FROM pg_catalog.pg_constraint
                  WHERE contype = 'f' AND confrelid = $1 AND conrelid <> $1 ORDER BY conrelid, conname",
                None,
                &[relid.into()],
            )?
            .map(|row| Ok((row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid), row.get::<String>(2)?.unwrap_or_default())))
            .collect()
    })
}
