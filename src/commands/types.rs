//! User-defined types of distributed and reference tables' columns: enum types and domains
//! (and arrays of them) are created on a node before a shard that uses them, and changes of an
//! enum's values reach the nodes that have it.
//!
//! A type is recreated from the coordinator's catalog under the same schema and name. A node
//! that already has a type of that name in use there must have the same definition (compared
//! as the statement that creates it); otherwise the shard is not created there, since values
//! and their order (an enum's) would differ from the coordinator's. One that nothing on the
//! node uses (a table's type that was dropped and created anew on the coordinator) is replaced.

use std::ffi::{c_char, CStr};
use std::rc::Rc;

use pgrx::{pg_sys, PgSqlErrorCode, Spi};

use crate::catalog::nodes::Node;
use crate::catalog::tables::DistributedTable;
use crate::connection::RemoteRows;
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};
use crate::transaction::remote;

/// The statement that creates the type `{target}` selects (the same query on the coordinator,
/// by OID, and on a node, by name); NULL for kinds of type that are not recreated.
const CREATE_STATEMENT: &str = "
SELECT CASE t.typtype
  WHEN 'e' THEN 'CREATE TYPE ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(t.typname)
    || ' AS ENUM (' || coalesce((SELECT pg_catalog.string_agg(pg_catalog.quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                                   FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid), '') || ')'
  WHEN 'd' THEN 'CREATE DOMAIN ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(t.typname) || ' AS '
    || CASE WHEN b.typnamespace = 'pg_catalog'::pg_catalog.regnamespace THEN pg_catalog.format_type(t.typbasetype, t.typtypmod)
            ELSE pg_catalog.quote_ident(bn.nspname) || '.' || pg_catalog.quote_ident(b.typname) END
    || CASE WHEN t.typcollation <> b.typcollation
            THEN ' COLLATE ' || pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) ELSE '' END
    || coalesce(' DEFAULT ' || pg_catalog.pg_get_expr(t.typdefaultbin, 0), '')
    || CASE WHEN t.typnotnull THEN ' NOT NULL' ELSE '' END
    || coalesce((SELECT pg_catalog.string_agg(' CONSTRAINT ' || pg_catalog.quote_ident(c.conname) || ' '
                                              || pg_catalog.pg_get_constraintdef(c.oid), '' ORDER BY c.conname)
                   FROM pg_catalog.pg_constraint c WHERE c.contypid = t.oid AND c.contype = 'c'), '')
  END
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_catalog.pg_type b ON b.oid = t.typbasetype
LEFT JOIN pg_catalog.pg_namespace bn ON bn.oid = b.typnamespace
LEFT JOIN pg_catalog.pg_collation co ON co.oid = t.typcollation
LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
WHERE t.oid = {target}";

/// The statement that creates the collation `{target}` selects (as CREATE_STATEMENT); NULL for
/// a provider that cannot be named.
const CREATE_COLLATION_STATEMENT: &str = "
SELECT 'CREATE COLLATION ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.collname) || ' ('
    || CASE c.collprovider
         WHEN 'i' THEN 'provider = icu, locale = ' || pg_catalog.quote_literal(c.colliculocale)
         WHEN 'c' THEN 'provider = libc, lc_collate = ' || pg_catalog.quote_literal(c.collcollate)
                       || ', lc_ctype = ' || pg_catalog.quote_literal(c.collctype) END
    || CASE WHEN c.collisdeterministic THEN '' ELSE ', deterministic = false' END || ')'
FROM pg_catalog.pg_collation c
JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace
WHERE c.oid = {target}";

/// The user-defined collations a table needs on the nodes (quoted `schema.name` and creating
/// statement): those its columns, indexes, constraints and defaults use (the catalog records
/// each use as a dependency), and those of the domains in `$2`.
const COLLATIONS_QUERY: &str = "
SELECT pg_catalog.quote_ident(on_.nspname) || '.' || pg_catalog.quote_ident(o.collname), ({statement})
  FROM pg_catalog.pg_collation o JOIN pg_catalog.pg_namespace on_ ON on_.oid = o.collnamespace
 WHERE o.oid >= 16384 AND o.oid IN (
   SELECT d.refobjid FROM pg_catalog.pg_depend d
    WHERE d.refclassid = 'pg_catalog.pg_collation'::pg_catalog.regclass
      AND ((d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND (d.objid = $1 OR d.objid IN (SELECT indexrelid FROM pg_catalog.pg_index WHERE indrelid = $1)))
        OR (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
            AND d.objid IN (SELECT oid FROM pg_catalog.pg_constraint WHERE conrelid = $1))
        OR (d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
            AND d.objid IN (SELECT oid FROM pg_catalog.pg_attrdef WHERE adrelid = $1))
        OR (d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.objid = ANY ($2))))
 ORDER BY 1";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Collation,
    Type,
}

/// A user-defined collation or type a table needs on the nodes.
struct UserType {
    kind: Kind,
    /// `schema.name`, quoted.
    name: String,
    create: String,
    oid: pg_sys::Oid,
}

/// The user-defined types the table's columns need, each after the types it is built on; an
/// error (0A000) for a column of a type that cannot be recreated on the nodes.
fn needed(definition: &table_ddl::TableDefinition, display: &str) -> Result<Vec<UserType>> {
    let mut types = Vec::new();
    for column in &definition.columns {
        if column.type_oid >= pg_sys::FirstNormalObjectId {
            add(pg_sys::Oid::from(column.type_oid), &mut types, &|| unsupported(display, &column.name, &column.type_sql))?;
        }
    }
    // Collations first: a domain may name one.
    let mut objects = collations(display, &types)?;
    objects.extend(types);
    Ok(objects)
}

/// The user-defined collations the table `display` and its `types` use.
fn collations(display: &str, types: &[UserType]) -> Result<Vec<UserType>> {
    let relid = crate::catalog::read_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[display.into()])?
        .unwrap_or(pg_sys::InvalidOid);
    let type_oids: Vec<pg_sys::Oid> = types.iter().map(|t| t.oid).collect();
    let query = COLLATIONS_QUERY.replace("{statement}", &CREATE_COLLATION_STATEMENT.replace("{target}", "o.oid"));
    let mut found = Vec::new();
    Spi::connect(|client| -> Result<()> {
        for row in client.select(&query, None, &[relid.into(), type_oids.into()])? {
            let name = row.get::<String>(1)?.unwrap_or_default();
            let Some(create) = row.get::<String>(2)? else {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("{display} uses the collation {name}, which pg_sharding cannot create on the nodes"),
                ));
            };
            found.push(UserType { kind: Kind::Collation, name, create, oid: pg_sys::InvalidOid });
        }
        Ok(())
    })?;
    Ok(found)
}

fn add(type_oid: pg_sys::Oid, types: &mut Vec<UserType>, refuse: &dyn Fn() -> ShardingError) -> Result<()> {
    if type_oid.to_u32() < pg_sys::FirstNormalObjectId {
        return Ok(());
    }
    // Composite types (category C) are not recreated: their binary form names their
    // attributes' types by OID, which differ from node to node.
    let (kind, element, base) = crate::catalog::read_three::<String, pg_sys::Oid, pg_sys::Oid>(
        "SELECT CASE WHEN typcategory = 'C' THEN 'composite' ELSE typtype::text END, typelem, typbasetype
           FROM pg_catalog.pg_type WHERE oid = $1",
        &[type_oid.into()],
    )?;
    match (kind.as_deref(), element, base) {
        // An array of enum or domain values: the array type comes with its element type.
        (Some("b"), Some(element), _) if element != pg_sys::InvalidOid => add(element, types, refuse),
        (Some("e"), ..) => add_named(type_oid, types, refuse),
        (Some("d"), _, Some(base)) => {
            add(base, types, refuse)?;
            add_named(type_oid, types, refuse)
        }
        _ => Err(refuse()),
    }
}

/// Adds the enum or domain `type_oid` (after what it is built on).
fn add_named(type_oid: pg_sys::Oid, types: &mut Vec<UserType>, refuse: &dyn Fn() -> ShardingError) -> Result<()> {
    let (name, create) = crate::catalog::read_two::<String, String>(
        &format!(
            "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(t.typname), ({})
               FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
            CREATE_STATEMENT.replace("{target}", "$1")
        ),
        &[type_oid.into()],
    )?;
    let (Some(name), Some(create)) = (name, create) else { return Err(refuse()) };
    if !types.iter().any(|t| t.name == name) {
        types.push(UserType { kind: Kind::Type, name, create, oid: type_oid });
    }
    Ok(())
}

fn unsupported(display: &str, column: &str, type_sql: &str) -> ShardingError {
    ShardingError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("column \"{column}\" of {display} has the type {type_sql}, which pg_sharding cannot create on the nodes"),
    )
    .hint("Columns may have built-in types, enum types, domains over those, and arrays of them.")
}

/// Checks, before anything changes, that the table's column types can be created on the nodes.
pub fn check(definition: &table_ddl::TableDefinition, display: &str) -> Result<()> {
    needed(definition, display).map(|_| ())
}

/// Creates the user-defined types the table's columns need on `node`, inside the distributed
/// transaction, unless the node has them already (with the same definition).
pub fn ensure_on(definition: &table_ddl::TableDefinition, node: &Node) -> Result<()> {
    ensure_with(definition, node, &|sql| remote::execute(node, sql))
}

/// `ensure_on`, running its statements with `run` (a connection of an operation's own).
pub fn ensure_with(definition: &table_ddl::TableDefinition, node: &Node, run: &dyn Fn(&str) -> Result<RemoteRows>) -> Result<()> {
    if node.is_coordinator {
        return Ok(());
    }
    let display = quote::qualified(&definition.schema, &definition.name);
    for user_type in needed(definition, &display)? {
        let (what, there) = match user_type.kind {
            Kind::Type => {
                let target = format!("pg_catalog.to_regtype({})", quote::literal(&user_type.name));
                ("type", run(&CREATE_STATEMENT.replace("{target}", &target))?)
            }
            Kind::Collation => {
                let target = format!("pg_catalog.to_regcollation({})", quote::literal(&user_type.name));
                ("collation", run(&CREATE_COLLATION_STATEMENT.replace("{target}", &target))?)
            }
        };
        match there.value(0, 0) {
            Some(existing) if existing == user_type.create => {}
            // A type nothing on the node uses (left there by a table since dropped, with the
            // type, on the coordinator) is replaced by the coordinator's definition.
            Some(existing) if !in_use_on_node(&user_type, run)? => {
                let drop = match user_type.kind {
                    Kind::Collation => "COLLATION",
                    Kind::Type if existing.starts_with("CREATE DOMAIN") => "DOMAIN",
                    Kind::Type => "TYPE",
                };
                // CASCADE: the node's arrays and domains of it, which nothing uses either.
                run(&format!("DROP {drop} {} CASCADE; {}", user_type.name, user_type.create))?;
            }
            Some(existing) => {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("{what} {} on node {}:{} differs from the coordinator's", user_type.name, node.host, node.port),
                )
                .detail(format!("coordinator: {}; node: {existing}", user_type.create))
                .hint("Drop or change the node's type to match the coordinator's."))
            }
            None if there.rows.is_empty() => {
                let mut sql = super::distribute::schema_statement(schema_of(&user_type.name), run)?;
                sql.push(user_type.create.clone());
                run(&sql.join("; "))?;
            }
            None => {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    match user_type.kind {
                        Kind::Type => format!("type {} on node {}:{} is not an enum or a domain", user_type.name, node.host, node.port),
                        Kind::Collation => {
                            format!("collation {} on node {}:{} is neither an ICU nor a libc collation", user_type.name, node.host, node.port)
                        }
                    },
                ))
            }
        }
    }
    Ok(())
}

/// Whether anything on the node uses the type (quoted `schema.name`): a column, a function's
/// argument, ... of it, of its array type, or of a domain built on it. Only types built on it
/// (arrays, domains and their constraints) do not count: they go with it. For a collation:
/// anything.
fn in_use_on_node(user_type: &UserType, run: &dyn Fn(&str) -> Result<RemoteRows>) -> Result<bool> {
    let name = &user_type.name;
    if user_type.kind == Kind::Collation {
        let rows = run(&format!(
            "SELECT 1 FROM pg_catalog.pg_depend WHERE refclassid = 'pg_catalog.pg_collation'::pg_catalog.regclass
                AND refobjid = pg_catalog.to_regcollation({}) LIMIT 1",
            quote::literal(name)
        ))?;
        return Ok(!rows.rows.is_empty());
    }
    let rows = run(&format!(
        "WITH RECURSIVE types(oid) AS (
            SELECT pg_catalog.to_regtype({})::pg_catalog.oid
            UNION
            SELECT d.objid FROM pg_catalog.pg_depend d JOIN types ON d.refobjid = types.oid
             WHERE d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass)
         SELECT 1 FROM pg_catalog.pg_depend d JOIN types ON d.refobjid = types.oid
          WHERE d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype = 'n'
            AND d.classid <> 'pg_catalog.pg_type'::pg_catalog.regclass
            AND NOT (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
                     AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c JOIN types t ON t.oid = c.contypid WHERE c.oid = d.objid))
          LIMIT 1",
        quote::literal(name)
    ))?;
    Ok(!rows.rows.is_empty())
}

/// The quoted schema of a quoted `schema.name` (quote_ident output: a dot inside quotes is part
/// of a name).
fn schema_of(qualified: &str) -> &str {
    let mut quoted = false;
    for (i, c) in qualified.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => return &qualified[..i],
            _ => {}
        }
    }
    qualified
}

// ---------------------------------------------------------------------------------------------
// Statements on the types (see commands/utility.rs)

/// The distributed and reference tables with a column of `type_oid` (directly, as an array's
/// element or a domain's base, at any depth).
fn tables_using(type_oid: pg_sys::Oid) -> Result<Vec<Rc<DistributedTable>>> {
    if type_oid == pg_sys::InvalidOid || type_oid.to_u32() < pg_sys::FirstNormalObjectId {
        return Ok(Vec::new());
    }
    let relids = crate::catalog::read_one::<Vec<pg_sys::Oid>>(
        "WITH RECURSIVE types(oid) AS (
            SELECT $1::pg_catalog.oid
            UNION
            SELECT d.objid FROM pg_catalog.pg_depend d JOIN types ON d.refobjid = types.oid
             WHERE d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass)
         SELECT coalesce(pg_catalog.array_agg(DISTINCT d.objid), '{}') FROM pg_catalog.pg_depend d JOIN types ON d.refobjid = types.oid
          WHERE d.refclassid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.objsubid > 0",
        &[type_oid.into()],
    )?
    .unwrap_or_default();
    let mut tables = Vec::new();
    for relid in relids {
        // SAFETY: reads our catalog cache.
        if let Some(table) = unsafe { super::utility::distributed_by_oid(relid)? } {
            tables.push(table);
        }
    }
    Ok(tables)
}

/// The type a name list names, InvalidOid when there is none (the statement then fails as it
/// would without pg_sharding).
unsafe fn type_named(names: *mut pg_sys::List) -> pg_sys::Oid {
    if names.is_null() {
        return pg_sys::InvalidOid;
    }
    let type_name = pg_sys::makeTypeNameFromNameList(names);
    pg_sys::LookupTypeNameOid(std::ptr::null_mut(), type_name, true)
}

/// `ALTER TYPE ... ADD VALUE / RENAME VALUE` of an enum that tables use.
pub unsafe fn enum_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    tables_using(type_named((*node.cast::<pg_sys::AlterEnumStmt>()).typeName))
}

/// `ALTER DOMAIN` of a domain that tables use (refused: its constraints would change on the
/// coordinator alone).
pub unsafe fn domain_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    tables_using(type_named((*node.cast::<pg_sys::AlterDomainStmt>()).typeName))
}

/// `DROP TYPE / DROP DOMAIN` of a type that tables use (refused: with CASCADE it would drop the
/// coordinator's columns alone).
pub unsafe fn drop_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::DropStmt>();
    if !matches!((*statement).removeType, pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN) {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for type_name in super::utility::list_pointers::<pg_sys::TypeName>((*statement).objects) {
        found.extend(tables_using(pg_sys::LookupTypeNameOid(std::ptr::null_mut(), type_name, true))?);
    }
    Ok(found)
}

/// `ALTER TYPE / DOMAIN ... RENAME TO` (refused: the nodes' types keep their names).
pub unsafe fn rename_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::RenameStmt>();
    if !matches!((*statement).renameType, pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN) {
        return Ok(Vec::new());
    }
    tables_using(type_named((*statement).object.cast()))
}

/// `ALTER TYPE / DOMAIN ... SET SCHEMA` (refused, as a rename).
pub unsafe fn set_schema_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::AlterObjectSchemaStmt>();
    if !matches!((*statement).objectType, pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN) {
        return Ok(Vec::new());
    }
    tables_using(type_named((*statement).object.cast()))
}

/// Refuses a change of a type that distributed tables use.
pub unsafe fn refuse(statement: *mut pg_sys::Node, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let command = CStr::from_ptr(pg_sys::CreateCommandName(statement)).to_string_lossy().into_owned();
    Err(ShardingError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{command} of a type that distributed table \"{}\" uses is not supported", targets[0].name),
    )
    .hint("Change or drop the table's column first."))
}

/// Runs `ALTER TYPE ... ADD VALUE / RENAME VALUE` here, then on every node that has the type,
/// in the distributed transaction, so that the values and their order stay the coordinator's.
pub fn run_enum_change(call: &super::utility::UtilityCall, _targets: &[Rc<DistributedTable>]) -> Result<()> {
    call.run_standard();
    // SAFETY: the statement is an AlterEnumStmt (the operation's tag); its strings are C strings.
    let (type_oid, change) = unsafe {
        let statement = call.statement().cast::<pg_sys::AlterEnumStmt>();
        let text = |s: *mut c_char| CStr::from_ptr(s).to_string_lossy().into_owned();
        let change = if !(*statement).oldVal.is_null() {
            format!("RENAME VALUE {} TO {}", quote::literal(&text((*statement).oldVal)), quote::literal(&text((*statement).newVal)))
        } else {
            let mut change = format!(
                "ADD VALUE {}{}",
                if (*statement).skipIfNewValExists { "IF NOT EXISTS " } else { "" },
                quote::literal(&text((*statement).newVal))
            );
            if !(*statement).newValNeighbor.is_null() {
                let side = if (*statement).newValIsAfter { "AFTER" } else { "BEFORE" };
                change.push_str(&format!(" {side} {}", quote::literal(&text((*statement).newValNeighbor))));
            }
            change
        };
        (type_named((*statement).typeName), change)
    };
    let name = crate::catalog::read_one::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(t.typname)
           FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
        &[type_oid.into()],
    )?
    .ok_or_else(|| ShardingError::internal("the changed enum type is gone"))?;
    let exists = format!("SELECT 1 FROM pg_catalog.pg_type WHERE oid = pg_catalog.to_regtype({})", quote::literal(&name));
    for node in crate::catalog::nodes::load_all()? {
        if node.is_coordinator || !node.is_active {
            continue;
        }
        if !remote::execute(&node, &exists)?.rows.is_empty() {
            remote::execute(&node, &format!("ALTER TYPE {name} {change}"))?;
        }
    }
    Ok(())
}
