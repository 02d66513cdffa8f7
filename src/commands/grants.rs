//! Privileges on distributed tables follow the coordinator's table: after GRANT or REVOKE, and
//! when a table is distributed, every shard's ACL, and its columns', is set to the table's as
//! the catalog holds them (aclexplode of pg_class.relacl and pg_attribute.attacl), so no GRANT
//! statement needs deparsing. Roles must exist on the workers too.

use std::collections::BTreeMap;

use pgrx::prelude::*;
use sharding_core::table_def::shard_object_name;

use crate::catalog::tables::DistributedTable;
use crate::deparse::quote;
use crate::error::Result;
use crate::transaction::remote;

/// One entry of a table's or a column's ACL.
struct Grant {
    /// Quoted, or PUBLIC.
    grantee: String,
    privilege: String,
    grantable: bool,
    /// The column (quoted), for a column privilege.
    column: Option<String>,
}

/// The table's and its columns' ACL entries, and its owner (quoted).
fn table_acl(relid: pg_sys::Oid) -> Result<(Vec<Grant>, String)> {
    let (grants, owner, _) = table_privileges(relid)?;
    Ok((grants, owner))
}

/// `table_acl`, and whether the current role is the table's owner.
fn table_privileges(relid: pg_sys::Oid) -> Result<(Vec<Grant>, String, bool)> {
    Spi::connect(|client| {
        let grants = client
            .select(
                "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END,
                        a.privilege_type, a.is_grantable, NULL::text
                   FROM pg_catalog.pg_class c
                  CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
                   LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
                  WHERE c.oid = $1
                 UNION ALL
                 SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END,
                        a.privilege_type, a.is_grantable, pg_catalog.quote_ident(t.attname)
                   FROM pg_catalog.pg_attribute t
                  CROSS JOIN LATERAL pg_catalog.aclexplode(t.attacl) a
                   LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
                  WHERE t.attrelid = $1 AND t.attnum > 0 AND NOT t.attisdropped
                  ORDER BY 4 NULLS FIRST, 1, 2",
                None,
                &[relid.into()],
            )?
            .map(|row| {
                Ok(Grant {
                    grantee: row.get::<String>(1)?.unwrap_or_default(),
                    privilege: row.get::<String>(2)?.unwrap_or_default(),
                    grantable: row.get::<bool>(3)?.unwrap_or(false),
                    column: row.get::<String>(4)?,
                })
            })
            .collect::<Result<Vec<Grant>>>()?;
        let (owner, is_current) = client
            .select(
                "SELECT pg_catalog.quote_ident(r.rolname), r.rolname = current_user FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_roles r ON r.oid = c.relowner WHERE c.oid = $1",
                Some(1),
                &[relid.into()],
            )?
            .first()
            .get_two::<String, bool>()?;
        Ok((grants, owner.unwrap_or_default(), is_current.unwrap_or(false)))
    })
}

/// Statements that give a shard just created (by the current role) the table's owner and
/// privileges: `ALTER ... OWNER TO` when the current role is not the owner (a superuser
/// distributing another role's table, a move, a split), then the table's grants.
pub fn new_shard_statements(relid: pg_sys::Oid, shard: &str) -> Result<Vec<String>> {
    let (grants, owner, is_owner) = table_privileges(relid)?;
    let mut statements = Vec::new();
    if !is_owner {
        statements.push(format!("ALTER TABLE {shard} OWNER TO {owner}"));
    }
    statements.extend(grant_statements(&grants, &owner, shard));
    Ok(statements)
}

/// The GRANTs of `grants` (but the owner's own) on `shard`: one per grantee and grant option
/// for the table's privileges, one per grantee, grant option and privilege for its columns'.
fn grant_statements(grants: &[Grant], owner: &str, shard: &str) -> Vec<String> {
    let mut table: BTreeMap<(&str, bool), Vec<&str>> = BTreeMap::new();
    let mut columns: BTreeMap<(&str, bool, &str), Vec<&str>> = BTreeMap::new();
    for grant in grants.iter().filter(|g| g.grantee != owner) {
        match &grant.column {
            None => table.entry((&grant.grantee, grant.grantable)).or_default().push(&grant.privilege),
            Some(column) => columns.entry((&grant.grantee, grant.grantable, &grant.privilege)).or_default().push(column),
        }
    }
    let option = |grantable: bool| if grantable { " WITH GRANT OPTION" } else { "" };
    let mut statements: Vec<String> = table
        .into_iter()
        .map(|((grantee, grantable), privileges)| format!("GRANT {} ON {shard} TO {grantee}{}", privileges.join(", "), option(grantable)))
        .collect();
    statements.extend(columns.into_iter().map(|((grantee, grantable, privilege), names)| {
        format!("GRANT {privilege} ({}) ON {shard} TO {grantee}{}", names.join(", "), option(grantable))
    }));
    statements
}

/// Gives every shard of `table` the table's owner, then its ACL: after the table was
/// distributed by another role than its owner, and after `ALTER TABLE ... OWNER TO`.
pub fn sync_owner(table: &DistributedTable, roles_before: &[String]) -> Result<()> {
    let (_, owner) = table_acl(table.relid)?;
    let statements = |shard: &str| vec![format!("ALTER TABLE {shard} OWNER TO {owner}")];
    run_per_node(table, &statements)?;
    sync_shards(table, roles_before)
}

/// Gives the shards of a table just distributed its owner (when the current role is not the
/// owner) and its ACL.
pub fn sync_new_shards(table: &DistributedTable) -> Result<()> {
    let (_, _, is_owner) = table_privileges(table.relid)?;
    if is_owner {
        sync_shards(table, &[])
    } else {
        sync_owner(table, &[])
    }
}

/// Runs the statements `for_shard` gives for each shard's qualified name on the shard's nodes,
/// one round trip per node.
fn run_per_node(table: &DistributedTable, for_shard: &dyn Fn(&str) -> Vec<String>) -> Result<()> {
    let nodes = crate::catalog::cache::nodes()?;
    let mut per_node: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for shard in &table.shards {
        let statements = for_shard(&quote::qualified(&table.schema, &shard_object_name(&table.name, shard.shard_id)));
        if statements.is_empty() {
            continue;
        }
        for node_id in &shard.placements {
            per_node.entry(*node_id).or_default().extend(statements.iter().cloned());
        }
    }
    for (node_id, statements) in per_node {
        let Some(node) = nodes.iter().find(|n| n.node_id == node_id) else { continue };
        remote::execute(node, &statements.join("; "))?;
    }
    Ok(())
}

/// The roles the table's ACL names now (quoted, PUBLIC included): call before a GRANT or
/// REVOKE, so that roles it removes are revoked on the shards too.
pub fn acl_roles(relid: pg_sys::Oid) -> Result<Vec<String>> {
    let (grants, _) = table_acl(relid)?;
    let mut roles: Vec<String> = grants.into_iter().map(|grant| grant.grantee).collect();
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Sets every shard's ACL to the table's: revokes from every role named before or now (the
/// owner keeps its rights; a table's REVOKE takes its columns' privileges too), then grants
/// what the table and its columns grant.
pub fn sync_shards(table: &DistributedTable, roles_before: &[String]) -> Result<()> {
    let (grants, owner) = table_acl(table.relid)?;
    let mut revoke: Vec<String> = roles_before.iter().cloned().chain(grants.iter().map(|grant| grant.grantee.clone())).collect();
    revoke.sort();
    revoke.dedup();
    revoke.retain(|role| *role != owner);
    run_per_node(table, &|name| {
        let mut statements = Vec::new();
        if !revoke.is_empty() {
            statements.push(format!("REVOKE ALL ON {name} FROM {}", revoke.join(", ")));
        }
        statements.extend(grant_statements(&grants, &owner, name));
        statements
    })
}

/// (grantee, privilege, grantable) of a schema's ACL; grantee quoted, or PUBLIC.
type SchemaGrant = (String, String, bool);

/// The ACL entries of the (quoted) schema on the coordinator, but its owner's, and the owner
/// (quoted).
fn schema_acl(schema: &str) -> Result<(Vec<SchemaGrant>, String)> {
    Spi::connect(|client| {
        let grants = client
            .select(
                "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END,
                        a.privilege_type, a.is_grantable
                   FROM pg_catalog.pg_namespace n
                  CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
                   LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
                  WHERE n.oid = pg_catalog.to_regnamespace($1) AND a.grantee <> n.nspowner
                  ORDER BY 1, 2",
                None,
                &[schema.into()],
            )?
            .map(|row| Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<String>(2)?.unwrap_or_default(), row.get::<bool>(3)?.unwrap_or(false))))
            .collect::<Result<Vec<_>>>()?;
        let owner = client
            .select(
                "SELECT pg_catalog.quote_ident(r.rolname) FROM pg_catalog.pg_namespace n
                   JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner WHERE n.oid = pg_catalog.to_regnamespace($1)",
                Some(1),
                &[schema.into()],
            )?
            .first()
            .get_one::<String>()?;
        Ok((grants, owner.unwrap_or_default()))
    })
}

/// The GRANTs that give the (quoted) schema on a node the privileges it has on the
/// coordinator (USAGE, so that other roles reach the shards in it).
pub fn schema_grant_statements(schema: &str) -> Result<Vec<String>> {
    let (grants, _) = schema_acl(schema)?;
    let mut grouped: BTreeMap<(String, bool), Vec<String>> = BTreeMap::new();
    for (grantee, privilege, grantable) in grants {
        grouped.entry((grantee, grantable)).or_default().push(privilege);
    }
    Ok(grouped
        .into_iter()
        .map(|((grantee, grantable), privileges)| {
            format!("GRANT {} ON SCHEMA {schema} TO {grantee}{}", privileges.join(", "), if grantable { " WITH GRANT OPTION" } else { "" })
        })
        .collect())
}

/// The roles the (quoted) schema's ACL names now: call before a GRANT or REVOKE on it.
pub fn schema_roles(schema: &str) -> Result<Vec<String>> {
    let (grants, _) = schema_acl(schema)?;
    let mut roles: Vec<String> = grants.into_iter().map(|(grantee, _, _)| grantee).collect();
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Sets the (quoted) schema's ACL on `nodes` to the coordinator's: revokes from the roles named
/// before or now, then grants. Neither the coordinator's owner of the schema nor the node's
/// (the role that created it there) is revoked from.
pub fn sync_schema(schema: &str, nodes: &[crate::catalog::nodes::Node], roles_before: &[String]) -> Result<()> {
    let (_, owner) = schema_acl(schema)?;
    let grants = schema_grant_statements(schema)?;
    let mut roles: Vec<String> = roles_before.iter().cloned().chain(schema_roles(schema)?).collect();
    roles.sort();
    roles.dedup();
    roles.retain(|role| *role != owner);
    for node in nodes.iter().filter(|n| !n.is_coordinator) {
        let found = remote::execute(
            node,
            &format!(
                "SELECT pg_catalog.quote_ident(r.rolname) FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
                  WHERE n.oid = pg_catalog.to_regnamespace({})",
                quote::literal(schema)
            ),
        )?;
        let Some(node_owner) = found.value(0, 0) else { continue };
        let revoke: Vec<&str> = roles.iter().map(String::as_str).filter(|role| *role != node_owner).collect();
        let mut statements = Vec::new();
        if !revoke.is_empty() {
            statements.push(format!("REVOKE ALL ON SCHEMA {schema} FROM {}", revoke.join(", ")));
        }
        statements.extend(grants.iter().cloned());
        if !statements.is_empty() {
            remote::execute(node, &statements.join("; "))?;
        }
    }
    Ok(())
}

/// Gives the (quoted) schema on `nodes` the coordinator's owner of it, then its ACL (after
/// ALTER SCHEMA ... OWNER TO or REASSIGN OWNED BY).
pub fn sync_schema_owner(schema: &str, nodes: &[crate::catalog::nodes::Node], roles_before: &[String]) -> Result<()> {
    let (_, owner) = schema_acl(schema)?;
    for node in nodes.iter().filter(|n| !n.is_coordinator) {
        let found = remote::execute(node, &format!("SELECT 1 WHERE pg_catalog.to_regnamespace({}) IS NOT NULL", quote::literal(schema)))?;
        if !found.rows.is_empty() {
            remote::execute(node, &format!("ALTER SCHEMA {schema} OWNER TO {owner}"))?;
        }
    }
    sync_schema(schema, nodes, roles_before)
}

/// `ALTER SCHEMA ... OWNER TO` the coordinator's owner of the (quoted) schema, for a schema a
/// superuser creates on a node for another role's schema (a role that is not a superuser
/// creates it as itself: it could not give it away).
pub fn schema_owner_statement(schema: &str) -> Result<Option<String>> {
    let (_, owner) = schema_acl(schema)?;
    let differs = crate::catalog::read_one::<bool>(
        "SELECT (SELECT n.nspowner <> r.oid AND r.rolsuper FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r
                  WHERE n.oid = pg_catalog.to_regnamespace($1) AND r.rolname = current_user)",
        &[schema.into()],
    )?;
    Ok(differs.unwrap_or(false).then(|| format!("ALTER SCHEMA {schema} OWNER TO {owner}")))
}
