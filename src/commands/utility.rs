//! The ProcessUtility hook: utility statements on distributed and reference tables.
//!
//! `OPERATIONS` is a table, one row per statement kind: how to find the distributed tables it
//! targets, what to check before anything runs, and how to run it. Definition changes (ALTER
//! TABLE, RENAME, CREATE/DROP INDEX) all run the same way: snapshot the table's definition,
//! let PostgreSQL apply the statement to the coordinator's table, snapshot again, and send the
//! difference (crates/core/src/table_def.rs) to every shard placement inside the distributed
//! transaction. A statement kind not in the table that targets a distributed table fails with
//! "not supported on distributed tables" instead of changing the coordinator alone.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::table_def::{diff, Change};

use super::foreign_keys::{self, NewShard};
use super::types;
use crate::catalog::cache;
use crate::catalog::nodes::Node;
use crate::catalog::tables::{DistributedTable, Method};
use crate::deparse::{quote, table as table_ddl};
use crate::error::{OrRaise, Result, ShardingError};
use crate::transaction::remote;

static mut PREVIOUS_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

extern "C-unwind" {
    /// src/hooks_c/hooks.c: installs the C entry points of the planner, ProcessUtility and
    /// ExecutorRun hooks.
    fn pg_sharding_install_hooks();
    /// src/hooks_c/hooks.c: the previous hook, or standard_ProcessUtility.
    #[allow(clippy::too_many_arguments)]
    fn pg_sharding_standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

pub fn install() {
    // SAFETY: called once from _PG_init while preloading; previous hooks are chained.
    unsafe {
        pg_sharding_install_hooks();
        PREVIOUS_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

/// The arguments of one ProcessUtility call, to run the standard implementation later.
pub struct UtilityCall {
    pub pstmt: *mut pg_sys::PlannedStmt,
    pub query_string: *const c_char,
    pub read_only_tree: bool,
    pub context: pg_sys::ProcessUtilityContext::Type,
    pub params: pg_sys::ParamListInfo,
    pub query_env: *mut pg_sys::QueryEnvironment,
    pub dest: *mut pg_sys::DestReceiver,
    pub qc: *mut pg_sys::QueryCompletion,
}

impl UtilityCall {
    /// Runs the statement as PostgreSQL would without pg_sharding (or the next hook).
    pub fn run_standard(&self) {
        // SAFETY: the arguments are exactly those this hook received; an ERROR becomes a Rust
        // panic at the guard and unwinds through our frames.
        unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                pg_sharding_standard_process_utility(
                    self.pstmt, self.query_string, self.read_only_tree, self.context,
                    self.params, self.query_env, self.dest, self.qc,
                )
            })
        }
    }

    pub fn statement(&self) -> *mut pg_sys::Node {
        // SAFETY: a utility PlannedStmt always carries its statement.
        unsafe { (*self.pstmt).utilityStmt }
    }
}

type Targets = unsafe fn(*mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>>;
type Check = unsafe fn(*mut pg_sys::Node, &[Rc<DistributedTable>]) -> Result<()>;
type Run = fn(&UtilityCall, &[Rc<DistributedTable>]) -> Result<()>;

struct Operation {
    tag: pg_sys::NodeTag,
    /// The distributed tables the statement touches (empty: not ours, run it normally).
    targets: Targets,
    check: Check,
    run: Run,
}

const OPERATIONS: &[Operation] = &[
    Operation { tag: pg_sys::NodeTag::T_CopyStmt, targets: copy_targets, check: no_check, run: crate::copy::run_copy },
    Operation { tag: pg_sys::NodeTag::T_TruncateStmt, targets: truncate_targets, check: no_check, run: run_truncate },
    Operation { tag: pg_sys::NodeTag::T_AlterTableStmt, targets: alter_table_targets, check: check_alter_table, run: run_definition_change },
    Operation { tag: pg_sys::NodeTag::T_RenameStmt, targets: rename_targets, check: check_rename, run: run_definition_change },
    Operation { tag: pg_sys::NodeTag::T_IndexStmt, targets: index_targets, check: check_index, run: run_definition_change },
    Operation { tag: pg_sys::NodeTag::T_DropStmt, targets: drop_index_targets, check: no_check, run: run_definition_change },
    Operation { tag: pg_sys::NodeTag::T_GrantStmt, targets: grant_targets, check: no_check, run: run_grant },
    Operation { tag: pg_sys::NodeTag::T_GrantStmt, targets: schema_grant_targets, check: no_check, run: run_schema_grant },
    Operation { tag: pg_sys::NodeTag::T_ReassignOwnedStmt, targets: reassign_targets, check: no_check, run: run_reassign },
    Operation { tag: pg_sys::NodeTag::T_AlterOwnerStmt, targets: schema_owner_targets, check: no_check, run: run_schema_owner },
    Operation { tag: pg_sys::NodeTag::T_DropOwnedStmt, targets: drop_owned_targets, check: no_check, run: run_drop_owned },
    // A local table's new foreign key to a distributed table: refused (the coordinator holds
    // neither the rows it would check nor sees the local rows when a shard deletes one).
    Operation { tag: pg_sys::NodeTag::T_CreateStmt, targets: local_key_targets, check: refuse_local_key, run: never },
    Operation { tag: pg_sys::NodeTag::T_AlterTableStmt, targets: local_key_targets, check: refuse_local_key, run: never },
    // Statements that would change the coordinator's table alone: refused. (Row-level security
    // policies are not here: the coordinator's planner enforces them on distributed tables.)
    Operation { tag: pg_sys::NodeTag::T_CreateTrigStmt, targets: trigger_targets, check: refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_RuleStmt, targets: rule_targets, check: refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_AlterObjectSchemaStmt, targets: set_schema_targets, check: refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_RenameStmt, targets: schema_rename_targets, check: refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_ClusterStmt, targets: cluster_targets, check: refuse, run: never },
    // Types of the tables' columns (commands/types.rs): enum values reach the nodes; other
    // changes are refused.
    Operation { tag: pg_sys::NodeTag::T_AlterEnumStmt, targets: types::enum_targets, check: no_check, run: types::run_enum_change },
    Operation { tag: pg_sys::NodeTag::T_AlterDomainStmt, targets: types::domain_targets, check: types::refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_DropStmt, targets: types::drop_targets, check: types::refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_RenameStmt, targets: types::rename_targets, check: types::refuse, run: never },
    Operation { tag: pg_sys::NodeTag::T_AlterObjectSchemaStmt, targets: types::set_schema_targets, check: types::refuse, run: never },
];

/// The operation and targets for a statement, when it touches distributed tables.
unsafe fn ours(pstmt: *mut pg_sys::PlannedStmt) -> Result<Option<(&'static Operation, Vec<Rc<DistributedTable>>)>> {
    // The statement kind first: ROLLBACK in a failed transaction block comes here too, and no
    // catalog may be read then.
    let statement = (*pstmt).utilityStmt;
    let tag = (*statement).type_;
    if !OPERATIONS.iter().any(|op| op.tag == tag) || !pg_sys::IsTransactionState() || !cache::extension_active() {
        return Ok(None);
    }
    // The first operation of the statement's kind that finds targets (DROP INDEX and DROP
    // TYPE are both a DropStmt).
    for operation in OPERATIONS.iter().filter(|op| op.tag == tag) {
        let targets = (operation.targets)(statement)?;
        if !targets.is_empty() {
            return Ok(Some((operation, targets)));
        }
    }
    Ok(None)
}

/// Called by the C hook: does pg_sharding handle this statement?
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_utility_wants(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    note_set_local((*pstmt).utilityStmt);
    ours(pstmt).or_raise().is_some()
}

/// Called by the C hook for the statements `pg_sharding_utility_wants` claimed.
#[no_mangle]
#[pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn pg_sharding_utility_run(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let call = UtilityCall { pstmt, query_string, read_only_tree, context, params, query_env, dest, qc };
    let Some((operation, targets)) = ours(pstmt).or_raise() else {
        return call.run_standard();
    };
    not_streamed(operation.tag, &targets).or_raise();
    (operation.check)(call.statement(), &targets).or_raise();
    (operation.run)(&call, &targets).or_raise();
}

/// Statements that lock the shards exclusively while this session still streams rows of them
/// (an open cursor): the stream's next tasks would wait for this transaction's own lock, so
/// they are refused, as PostgreSQL refuses them for a table an open cursor reads.
fn not_streamed(tag: pg_sys::NodeTag, targets: &[Rc<DistributedTable>]) -> Result<()> {
    use pg_sys::NodeTag::*;
    let command = match tag {
        T_TruncateStmt => "TRUNCATE",
        T_AlterTableStmt | T_RenameStmt => "ALTER TABLE",
        T_DropStmt => "DROP INDEX",
        _ => return Ok(()),
    };
    match targets.iter().find(|t| crate::executor::remote_scan::is_streamed(t.relid)) {
        Some(table) => Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("cannot {command} \"{}\" because it is being used by active queries in this session", table.name),
        )
        .hint("Close the cursors reading the table first.")),
        None => Ok(()),
    }
}

/// SET LOCAL in a transaction block: the remote transactions get the value too.
unsafe fn note_set_local(statement: *mut pg_sys::Node) {
    if statement.is_null() || !pg_sys::IsTransactionBlock() {
        return;
    }
    // SET CONSTRAINTS ALL: the shards' constraints follow. (Named constraints are the
    // coordinator's names, not the shards'.)
    if (*statement).type_ == pg_sys::NodeTag::T_ConstraintsSetStmt {
        let set = statement.cast::<pg_sys::ConstraintsSetStmt>();
        if (*set).constraints.is_null() {
            crate::transaction::remote::note_constraints_all((*set).deferred);
        }
        return;
    }
    if (*statement).type_ != pg_sys::NodeTag::T_VariableSetStmt {
        return;
    }
    let set = statement.cast::<pg_sys::VariableSetStmt>();
    use pg_sys::VariableSetKind::*;
    if !(*set).is_local || (*set).name.is_null() || !matches!((*set).kind, VAR_SET_VALUE | VAR_SET_DEFAULT | VAR_SET_CURRENT | VAR_RESET) {
        return;
    }
    crate::transaction::remote::note_local_setting(&CStr::from_ptr((*set).name).to_string_lossy());
}

unsafe fn no_check(_: *mut pg_sys::Node, _: &[Rc<DistributedTable>]) -> Result<()> {
    Ok(())
}

fn never(_: &UtilityCall, _: &[Rc<DistributedTable>]) -> Result<()> {
    Err(ShardingError::internal("refused statement reached execution"))
}

unsafe fn refuse(statement: *mut pg_sys::Node, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let command = CStr::from_ptr(pg_sys::CreateCommandName(statement)).to_string_lossy().into_owned();
    Err(ShardingError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{command} is not supported on distributed tables"),
    )
    .detail(format!("\"{}\" is a {} table.", targets[0].name, targets[0].method.as_str())))
}

/// Refuses a new foreign key of a local table (`statement` creates or alters it) to the
/// distributed table `targets[0]`.
unsafe fn refuse_local_key(statement: *mut pg_sys::Node, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let relation = match (*statement).type_ {
        pg_sys::NodeTag::T_CreateStmt => (*statement.cast::<pg_sys::CreateStmt>()).relation,
        _ => (*statement.cast::<pg_sys::AlterTableStmt>()).relation,
    };
    let local = CStr::from_ptr((*relation).relname).to_string_lossy().into_owned();
    let referenced = &targets[0].name;
    Err(unsupported(format!("a foreign key from local table \"{local}\" to distributed table \"{referenced}\" is not supported"))
        .detail("The coordinator does not hold the rows of a distributed table, and a shard deleting a row does not see the local rows that reference it.")
        .hint(format!(
            "Distribute \"{local}\" with colocate_with => '{referenced}' first (create it without the key, distribute it, then add the key), or make \"{referenced}\" a reference table."
        )))
}

// ---------------------------------------------------------------------------------------------
// Finding targets

/// Elements of a PostgreSQL List of pointers.
pub unsafe fn list_pointers<T>(list: *mut pg_sys::List) -> Vec<*mut T> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).ptr_value.cast()).collect()
}

pub unsafe fn distributed_by_oid(relid: pg_sys::Oid) -> Result<Option<Rc<DistributedTable>>> {
    if relid == pg_sys::InvalidOid || relid.to_u32() < pg_sys::FirstNormalObjectId {
        return Ok(None);
    }
    cache::table_unless_reentrant(relid)
}

/// The relation a RangeVar names, InvalidOid when it does not exist (no lock taken: the
/// statement itself locks what it changes).
pub unsafe fn relid_of(relation: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    if relation.is_null() {
        return pg_sys::InvalidOid;
    }
    pg_sys::RangeVarGetRelidExtended(
        relation,
        pg_sys::NoLock as pg_sys::LOCKMODE,
        pg_sys::RVROption::RVR_MISSING_OK,
        None,
        std::ptr::null_mut(),
    )
}

/// Elements of a PostgreSQL integer List.
pub unsafe fn oid_list(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect()
}

pub unsafe fn int_list(list: *mut pg_sys::List) -> Vec<i32> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).int_value).collect()
}

pub unsafe fn distributed_by_rangevar(relation: *mut pg_sys::RangeVar) -> Result<Option<Rc<DistributedTable>>> {
    distributed_by_oid(relid_of(relation))
}

fn one(table: Option<Rc<DistributedTable>>) -> Vec<Rc<DistributedTable>> {
    table.into_iter().collect()
}

unsafe fn copy_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    Ok(one(distributed_by_rangevar((*node.cast::<pg_sys::CopyStmt>()).relation)?))
}

unsafe fn truncate_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let mut found = Vec::new();
    for relation in list_pointers::<pg_sys::RangeVar>((*node.cast::<pg_sys::TruncateStmt>()).relations) {
        found.extend(distributed_by_rangevar(relation)?);
    }
    Ok(found)
}

/// The distributed table a statement about a table names (nothing for other object types).
unsafe fn table_target(objtype: pg_sys::ObjectType::Type, relation: *mut pg_sys::RangeVar) -> Result<Vec<Rc<DistributedTable>>> {
    if objtype != pg_sys::ObjectType::OBJECT_TABLE {
        return Ok(Vec::new());
    }
    Ok(one(distributed_by_rangevar(relation)?))
}

unsafe fn alter_table_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::AlterTableStmt>();
    table_target((*statement).objtype, (*statement).relation)
}

/// The distributed tables that foreign keys of a new table, or of a local table being altered,
/// would reference.
unsafe fn local_key_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    use pg_sys::NodeTag::*;
    let column_constraints =
        |definition: *mut pg_sys::ColumnDef| list_pointers::<pg_sys::Constraint>((*definition).constraints);
    let mut constraints = Vec::new();
    if (*node).type_ == T_CreateStmt {
        let statement = node.cast::<pg_sys::CreateStmt>();
        constraints.extend(list_pointers::<pg_sys::Constraint>((*statement).constraints));
        for element in list_pointers::<pg_sys::Node>((*statement).tableElts) {
            if (*element).type_ == T_ColumnDef {
                constraints.extend(column_constraints(element.cast()));
            }
        }
    } else {
        let statement = node.cast::<pg_sys::AlterTableStmt>();
        if distributed_by_rangevar((*statement).relation)?.is_some() {
            // The keys of distributed and reference tables are checked with their changes.
            return Ok(Vec::new());
        }
        for command in list_pointers::<pg_sys::AlterTableCmd>((*statement).cmds) {
            let definition = (*command).def;
            if definition.is_null() {
                continue;
            }
            match (*definition).type_ {
                T_Constraint => constraints.push(definition.cast()),
                T_ColumnDef => constraints.extend(column_constraints(definition.cast())),
                _ => {}
            }
        }
    }
    let mut found: Vec<Rc<DistributedTable>> = Vec::new();
    for constraint in constraints {
        if (*constraint).contype != pg_sys::ConstrType::CONSTR_FOREIGN {
            continue;
        }
        if let Some(table) = distributed_by_rangevar((*constraint).pktable)? {
            if table.method == Method::Hash && !found.iter().any(|t| t.relid == table.relid) {
                found.push(table);
            }
        }
    }
    Ok(found)
}

unsafe fn rename_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::RenameStmt>();
    use pg_sys::ObjectType::*;
    match (*statement).renameType {
        OBJECT_TABLE | OBJECT_COLUMN | OBJECT_TABCONSTRAINT => Ok(one(distributed_by_rangevar((*statement).relation)?)),
        OBJECT_INDEX => {
            let index = relid_of((*statement).relation);
            if index == pg_sys::InvalidOid {
                return Ok(Vec::new());
            }
            Ok(one(distributed_by_oid(pg_sys::IndexGetRelation(index, true))?))
        }
        _ => Ok(Vec::new()),
    }
}

unsafe fn index_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    Ok(one(distributed_by_rangevar((*node.cast::<pg_sys::IndexStmt>()).relation)?))
}

unsafe fn drop_index_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::DropStmt>();
    if (*statement).removeType != pg_sys::ObjectType::OBJECT_INDEX {
        // DROP TABLE (also through CASCADE) is handled by the object access hook below.
        return Ok(Vec::new());
    }
    let mut found: Vec<Rc<DistributedTable>> = Vec::new();
    for names in list_pointers::<pg_sys::List>((*statement).objects) {
        let index = relid_of(pg_sys::makeRangeVarFromNameList(names));
        if index == pg_sys::InvalidOid {
            continue;
        }
        if let Some(table) = distributed_by_oid(pg_sys::IndexGetRelation(index, true))? {
            if !found.iter().any(|t| t.relid == table.relid) {
                found.push(table);
            }
        }
    }
    Ok(found)
}

unsafe fn grant_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::GrantStmt>();
    if (*statement).objtype != pg_sys::ObjectType::OBJECT_TABLE {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    if (*statement).targtype == pg_sys::GrantTargetType::ACL_TARGET_OBJECT {
        for relation in list_pointers::<pg_sys::RangeVar>((*statement).objects) {
            found.extend(distributed_by_rangevar(relation)?);
        }
    } else if (*statement).targtype == pg_sys::GrantTargetType::ACL_TARGET_ALL_IN_SCHEMA {
        // GRANT ... ON ALL TABLES IN SCHEMA s: the distributed tables of those schemas.
        for schema in list_pointers::<pg_sys::String>((*statement).objects) {
            found.extend(tables_in_schema(&CStr::from_ptr((*schema).sval).to_string_lossy())?);
        }
    }
    Ok(found)
}

/// The schemas a GRANT or REVOKE ON SCHEMA names (quoted).
unsafe fn granted_schemas(node: *mut pg_sys::Node) -> Vec<String> {
    let statement = node.cast::<pg_sys::GrantStmt>();
    if (*statement).objtype != pg_sys::ObjectType::OBJECT_SCHEMA || (*statement).targtype != pg_sys::GrantTargetType::ACL_TARGET_OBJECT {
        return Vec::new();
    }
    list_pointers::<pg_sys::String>((*statement).objects)
        .into_iter()
        .map(|schema| quote::ident(&CStr::from_ptr((*schema).sval).to_string_lossy()))
        .collect()
}

/// GRANT or REVOKE ON SCHEMA of schemas holding distributed tables (the nodes have a schema of
/// the same name for their shards).
unsafe fn schema_grant_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let mut found = Vec::new();
    for schema in granted_schemas(node) {
        let name = crate::catalog::read_one::<String>(
            "SELECT (SELECT nspname::text FROM pg_catalog.pg_namespace WHERE oid = pg_catalog.to_regnamespace($1))",
            &[schema.as_str().into()],
        )?;
        if let Some(name) = name {
            found.extend(tables_in_schema(&name)?);
        }
    }
    Ok(found)
}

/// REASSIGN OWNED BY: the distributed and reference tables the roles own.
unsafe fn reassign_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    // Their tables, and the tables in their schemas (the nodes' schemas follow too).
    distributed_tables_where(
        "SELECT t.logicalrelid::oid FROM sharding.dist_table t
           JOIN pg_catalog.pg_class c ON c.oid = t.logicalrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relowner = ANY($1) OR n.nspowner = ANY($1)",
        &[reassigned_roles(node).into()],
    )
}

/// The roles a REASSIGN OWNED BY names (those that exist).
unsafe fn reassigned_roles(node: *mut pg_sys::Node) -> Vec<pg_sys::Oid> {
    role_oids((*node.cast::<pg_sys::ReassignOwnedStmt>()).roles)
}

/// DROP OWNED BY: the distributed and reference tables whose privileges, or whose schema's,
/// name the roles (those they own are dropped, with their shards, by the drop itself).
unsafe fn drop_owned_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let roles = role_oids((*node.cast::<pg_sys::DropOwnedStmt>()).roles);
    if roles.is_empty() {
        return Ok(Vec::new());
    }
    distributed_tables_where(
        "SELECT t.logicalrelid::oid FROM sharding.dist_table t JOIN pg_catalog.pg_class c ON c.oid = t.logicalrelid
          WHERE c.relowner <> ALL($1)
            AND (EXISTS (SELECT 1 FROM pg_catalog.aclexplode(c.relacl) a WHERE a.grantee = ANY($1))
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute t, pg_catalog.aclexplode(t.attacl) a
                             WHERE t.attrelid = c.oid AND a.grantee = ANY($1))
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
                             WHERE n.oid = c.relnamespace AND a.grantee = ANY($1)))",
        &[roles.into()],
    )
}

/// DROP OWNED BY: the shards, and the nodes' schemas, lose the privileges the tables and
/// their schemas lost.
fn run_drop_owned(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let before: Vec<Vec<String>> = targets.iter().map(|t| super::grants::acl_roles(t.relid)).collect::<Result<_>>()?;
    let schemas = schemas_of(targets);
    let schemas_before: Vec<Vec<String>> = schemas.iter().map(|s| super::grants::schema_roles(s)).collect::<Result<_>>()?;
    call.run_standard();
    for (table, roles) in targets.iter().zip(before) {
        super::grants::sync_shards(table, &roles)?;
    }
    let nodes = cache::nodes()?;
    for (schema, roles) in schemas.iter().zip(schemas_before) {
        super::grants::sync_schema(schema, &nodes, &roles)?;
    }
    Ok(())
}

/// ALTER SCHEMA ... OWNER TO of a schema holding distributed tables.
unsafe fn schema_owner_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::AlterOwnerStmt>();
    if (*statement).objectType != pg_sys::ObjectType::OBJECT_SCHEMA || (*statement).object.is_null() {
        return Ok(Vec::new());
    }
    let name = CStr::from_ptr((*(*statement).object.cast::<pg_sys::String>()).sval).to_string_lossy().into_owned();
    tables_in_schema(&name)
}

/// The schemas (quoted) of `tables`, each once.
fn schemas_of(tables: &[Rc<DistributedTable>]) -> Vec<String> {
    let mut schemas: Vec<String> = tables.iter().map(|t| quote::ident(&t.schema)).collect();
    schemas.sort();
    schemas.dedup();
    schemas
}

/// ALTER SCHEMA ... OWNER TO: the nodes' schema of the same name gets the new owner and ACL.
fn run_schema_owner(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let schemas = schemas_of(targets);
    let before: Vec<Vec<String>> = schemas.iter().map(|s| super::grants::schema_roles(s)).collect::<Result<_>>()?;
    call.run_standard();
    let nodes = cache::nodes()?;
    for (schema, roles) in schemas.iter().zip(before) {
        super::grants::sync_schema_owner(schema, &nodes, &roles)?;
    }
    Ok(())
}

/// The distributed and reference tables of the schema named `schema`.
unsafe fn tables_in_schema(schema: &str) -> Result<Vec<Rc<DistributedTable>>> {
    distributed_tables_where(
        "SELECT t.logicalrelid::oid FROM sharding.dist_table t
           JOIN pg_catalog.pg_class c ON c.oid = t.logicalrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1",
        &[schema.into()],
    )
}

/// The distributed and reference tables whose oids `sql` returns, each once.
unsafe fn distributed_tables_where(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Result<Vec<Rc<DistributedTable>>> {
    let relids = pgrx::Spi::connect(|client| -> Result<Vec<pg_sys::Oid>> {
        client.select(sql, None, args)?.map(|row| Ok(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid))).collect()
    })?;
    let mut found: Vec<Rc<DistributedTable>> = Vec::new();
    for relid in relids {
        if let Some(table) = distributed_by_oid(relid)? {
            if !found.iter().any(|t| t.relid == table.relid) {
                found.push(table);
            }
        }
    }
    Ok(found)
}

/// The roles of a list of RoleSpecs (those that exist).
unsafe fn role_oids(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    list_pointers::<pg_sys::RoleSpec>(list)
        .into_iter()
        .map(|role| pg_sys::get_rolespec_oid(role, true))
        .filter(|oid| *oid != pg_sys::InvalidOid)
        .collect()
}

/// ALTER SCHEMA ... RENAME of a schema holding distributed tables (their shards live in a schema
/// of the same name on the nodes).
unsafe fn schema_rename_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::RenameStmt>();
    if (*statement).renameType != pg_sys::ObjectType::OBJECT_SCHEMA || (*statement).subname.is_null() {
        return Ok(Vec::new());
    }
    tables_in_schema(&CStr::from_ptr((*statement).subname).to_string_lossy())
}

unsafe fn trigger_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    Ok(one(distributed_by_rangevar((*node.cast::<pg_sys::CreateTrigStmt>()).relation)?))
}

unsafe fn rule_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    Ok(one(distributed_by_rangevar((*node.cast::<pg_sys::RuleStmt>()).relation)?))
}

unsafe fn set_schema_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    let statement = node.cast::<pg_sys::AlterObjectSchemaStmt>();
    table_target((*statement).objectType, (*statement).relation)
}

unsafe fn cluster_targets(node: *mut pg_sys::Node) -> Result<Vec<Rc<DistributedTable>>> {
    Ok(one(distributed_by_rangevar((*node.cast::<pg_sys::ClusterStmt>()).relation)?))
}

// ---------------------------------------------------------------------------------------------
// Checks that must pass before the coordinator's table changes

fn unsupported(message: impl Into<String>) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message)
}

unsafe fn check_constraint_node(constraint: *mut pg_sys::Constraint) -> Result<()> {
    match (*constraint).contype {
        pg_sys::ConstrType::CONSTR_EXCLUSION => Err(unsupported("exclusion constraints on distributed tables are not supported")),
        _ => Ok(()),
    }
}

#[allow(non_upper_case_globals)]
unsafe fn check_alter_table(node: *mut pg_sys::Node, _targets: &[Rc<DistributedTable>]) -> Result<()> {
    use pg_sys::AlterTableType::*;
    for command in list_pointers::<pg_sys::AlterTableCmd>((*node.cast::<pg_sys::AlterTableStmt>()).cmds) {
        match (*command).subtype {
            AT_AddColumn => {
                let definition = (*command).def.cast::<pg_sys::ColumnDef>();
                for constraint in list_pointers::<pg_sys::Constraint>((*definition).constraints) {
                    check_constraint_node(constraint)?;
                }
            }
            AT_AlterColumnType => {
                let definition = (*command).def.cast::<pg_sys::ColumnDef>();
                if !(*definition).raw_default.is_null() {
                    return Err(unsupported("ALTER COLUMN ... TYPE ... USING is not supported on distributed tables")
                        .hint("Change the type without USING (an implicit or assignment cast), or add a new column and fill it."));
                }
            }
            AT_AddConstraint => check_constraint_node((*command).def.cast())?,
            AT_ColumnDefault | AT_DropNotNull | AT_SetNotNull | AT_DropColumn | AT_DropConstraint | AT_ValidateConstraint => {}
            // Row-level security is enforced by the coordinator's planner (its policies become
            // conditions of the plan); the shards keep none of their own.
            AT_EnableRowSecurity | AT_DisableRowSecurity | AT_ForceRowSecurity | AT_NoForceRowSecurity => {}
            // The shards follow the new owner (run_definition_change).
            AT_ChangeOwner => {}
            other => {
                return Err(unsupported(format!(
                    "this ALTER TABLE subcommand (AlterTableType {other}) is not supported on distributed tables"
                ))
                .hint("Supported: ADD/DROP/RENAME COLUMN, ALTER COLUMN TYPE/SET DEFAULT/DROP DEFAULT/SET NOT NULL/DROP NOT NULL, ADD/DROP/VALIDATE CONSTRAINT, ENABLE/DISABLE/FORCE ROW LEVEL SECURITY, OWNER TO."))
            }
        }
    }
    Ok(())
}

unsafe fn check_rename(_node: *mut pg_sys::Node, _targets: &[Rc<DistributedTable>]) -> Result<()> {
    Ok(())
}

/// A unique index on a hash-distributed table must include the distribution column. Checked
/// again on the result (validate_changes); checked here first for CREATE INDEX CONCURRENTLY,
/// whose coordinator index would be left behind invalid by a refusal after it ran.
unsafe fn check_index(node: *mut pg_sys::Node, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let statement = node.cast::<pg_sys::IndexStmt>();
    let Some(table) = targets.first() else { return Ok(()) };
    let Some(distribution) = table.distribution_column.as_deref() else { return Ok(()) };
    if !(*statement).unique || !(*statement).concurrent {
        return Ok(());
    }
    let names: Vec<String> = list_pointers::<pg_sys::IndexElem>((*statement).indexParams)
        .into_iter()
        .filter(|&element| !(*element).name.is_null())
        .map(|element| CStr::from_ptr((*element).name).to_string_lossy().into_owned())
        .collect();
    if names.iter().any(|name| name == distribution) {
        return Ok(());
    }
    let index = if (*statement).idxname.is_null() {
        format!("a unique index on \"{}\"", table.name)
    } else {
        format!("unique index \"{}\"", CStr::from_ptr((*statement).idxname).to_string_lossy())
    };
    Err(unsupported(format!("{index} must include the distribution column \"{distribution}\"")))
}

/// ALTER TABLE ... OWNER TO.
unsafe fn changes_owner(statement: *mut pg_sys::Node) -> bool {
    (*statement).type_ == pg_sys::NodeTag::T_AlterTableStmt
        && list_pointers::<pg_sys::AlterTableCmd>((*statement.cast::<pg_sys::AlterTableStmt>()).cmds)
            .into_iter()
            .any(|command| (*command).subtype == pg_sys::AlterTableType::AT_ChangeOwner)
}

/// CREATE INDEX CONCURRENTLY / DROP INDEX CONCURRENTLY: the shards get the same, one statement
/// at a time outside any transaction (as PostgreSQL requires).
unsafe fn is_concurrent(statement: *mut pg_sys::Node) -> bool {
    match (*statement).type_ {
        pg_sys::NodeTag::T_IndexStmt => (*statement.cast::<pg_sys::IndexStmt>()).concurrent,
        pg_sys::NodeTag::T_DropStmt => (*statement.cast::<pg_sys::DropStmt>()).concurrent,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Running

/// Placement nodes of every shard, grouped by node.
fn shards_by_node(table: &DistributedTable) -> Result<BTreeMap<i32, (Node, Vec<i64>)>> {
    let nodes = cache::nodes()?;
    let mut grouped: BTreeMap<i32, (Node, Vec<i64>)> = BTreeMap::new();
    for shard in &table.shards {
        for node_id in &shard.placements {
            let node = nodes.iter().find(|n| n.node_id == *node_id).ok_or_else(|| {
                ShardingError::internal(format!("shard {} is placed on unknown node {node_id}", shard.shard_id))
            })?;
            grouped.entry(*node_id).or_insert_with(|| (node.clone(), Vec::new())).1.push(shard.shard_id);
        }
    }
    Ok(grouped)
}

fn run_truncate(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    call.run_standard();
    let mut per_node: BTreeMap<i32, (Node, Vec<String>)> = BTreeMap::new();
    for table in targets {
        let definition = table_ddl::read(table.relid)?;
        for (node_id, (node, shards)) in shards_by_node(table)? {
            let entry = per_node.entry(node_id).or_insert_with(|| (node, Vec::new()));
            entry.1.extend(shards.iter().map(|id| definition.shard_name(*id, &quote::ident)));
        }
    }
    // CASCADE reaches the shards of the referencing tables through the shards' own keys.
    // SAFETY: the statement of the call being run is a TruncateStmt.
    let cascade = unsafe { (*call.statement().cast::<pg_sys::TruncateStmt>()).behavior } == pg_sys::DropBehavior::DROP_CASCADE;
    for (node, names) in per_node.values() {
        remote::execute(node, &format!("TRUNCATE {}{}", names.join(", "), if cascade { " CASCADE" } else { "" }))?;
    }
    Ok(())
}

fn run_grant(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let before: Vec<Vec<String>> =
        targets.iter().map(|t| super::grants::acl_roles(t.relid)).collect::<Result<_>>()?;
    call.run_standard();
    for (table, roles) in targets.iter().zip(before) {
        super::grants::sync_shards(table, &roles)?;
    }
    Ok(())
}

/// GRANT or REVOKE ON SCHEMA: the nodes' schemas of the same name get the same ACL.
fn run_schema_grant(call: &UtilityCall, _targets: &[Rc<DistributedTable>]) -> Result<()> {
    // SAFETY: the statement of the call being run is a GrantStmt.
    let schemas = unsafe { granted_schemas(call.statement()) };
    let before: Vec<Vec<String>> = schemas.iter().map(|s| super::grants::schema_roles(s)).collect::<Result<_>>()?;
    call.run_standard();
    let nodes = cache::nodes()?;
    for (schema, roles) in schemas.iter().zip(before) {
        super::grants::sync_schema(schema, &nodes, &roles)?;
    }
    Ok(())
}

/// REASSIGN OWNED BY: the shards of the tables it gives away follow them to the new owner.
fn run_reassign(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    // SAFETY: the statement of the call being run is a ReassignOwnedStmt.
    let roles = unsafe { reassigned_roles(call.statement()) };
    let owned_by = |sql: &str, oid: pg_sys::Oid| -> Result<bool> {
        Ok(crate::catalog::read_one::<bool>(sql, &[oid.into(), roles.clone().into()])?.unwrap_or(false))
    };
    let mut tables = Vec::new();
    for table in targets {
        if owned_by("SELECT relowner = ANY($2) FROM pg_catalog.pg_class WHERE oid = $1", table.relid)? {
            tables.push((table.clone(), super::grants::acl_roles(table.relid)?));
        }
    }
    let mut schemas = Vec::new();
    for schema in schemas_of(targets) {
        let name = crate::catalog::read_one::<pg_sys::Oid>("SELECT pg_catalog.to_regnamespace($1)::oid", &[schema.as_str().into()])?;
        if let Some(oid) = name {
            if owned_by("SELECT nspowner = ANY($2) FROM pg_catalog.pg_namespace WHERE oid = $1", oid)? {
                let before = super::grants::schema_roles(&schema)?;
                schemas.push((schema, before));
            }
        }
    }
    call.run_standard();
    for (table, roles) in tables {
        super::grants::sync_owner(&table, &roles)?;
    }
    let nodes = cache::nodes()?;
    for (schema, roles) in schemas {
        super::grants::sync_schema_owner(&schema, &nodes, &roles)?;
    }
    Ok(())
}

/// Checks the changes an ALTER made are ones shards can follow.
fn validate_changes(table: &DistributedTable, changes: &[Change]) -> Result<()> {
    let distribution = table.distribution_column.clone().unwrap_or_default();
    let attnum = table.distribution_attnum;
    for change in changes {
        match change {
            Change::DropColumn(name) if table.method == Method::Hash && *name == distribution => {
                return Err(unsupported(format!("cannot drop the distribution column \"{name}\"")))
            }
            Change::AlterType(column) if Some(column.attnum) == attnum => {
                return Err(unsupported(format!("cannot change the type of the distribution column \"{}\"", column.name))
                    .detail("Every row's shard is computed from this column's value."))
            }
            Change::AddColumn(column) if column.coordinator_default => {
                return Err(unsupported(format!(
                    "cannot add column \"{}\": its default (a sequence or identity) can only be computed on the coordinator",
                    column.name
                ))
                .hint("Add the column without the default, then set the default: new rows get values from the coordinator."))
            }
            Change::AddConstraint(constraint)
                if matches!(constraint.kind, 'p' | 'u') && attnum.is_some_and(|a| !constraint.columns.contains(&a)) =>
            {
                return Err(unsupported(format!(
                    "constraint \"{}\" must include the distribution column \"{distribution}\"",
                    constraint.name
                ))
                .hint("Unique constraints are enforced within each shard."))
            }
            Change::CreateIndex(index)
                if index.unique && attnum.is_some_and(|a| !index.columns[..index.key_count.min(index.columns.len())].contains(&a)) =>
            {
                return Err(unsupported(format!(
                    "unique index \"{}\" must include the distribution column \"{distribution}\"",
                    index.name
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The foreign keys an ALTER added, once checked that the shards can enforce them.
fn added_foreign_keys(table: &DistributedTable, changes: &[Change]) -> Result<Vec<foreign_keys::ForeignKey>> {
    let names: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::AddConstraint(constraint) if constraint.kind == 'f' => Some(constraint.name.as_str()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<_> = table_ddl::foreign_keys(table.relid)?.into_iter().filter(|k| names.contains(&k.name.as_str())).collect();
    foreign_keys::check_keys(table.relid, foreign_keys::kind_of(table.relid)?, &keys)?;
    Ok(keys)
}

fn run_definition_change(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    // SAFETY: the statement of the call being run.
    let concurrent = unsafe { is_concurrent(call.statement()) };
    let before: Vec<_> = targets.iter().map(|t| table_ddl::read(t.relid)).collect::<Result<_>>()?;
    // SAFETY: the statement of the call being run.
    let owner_change = unsafe { changes_owner(call.statement()) };
    let acl_before: Vec<Vec<String>> = if owner_change {
        targets.iter().map(|t| super::grants::acl_roles(t.relid)).collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    call.run_standard();
    for (table, roles) in targets.iter().zip(&acl_before) {
        super::grants::sync_owner(table, roles)?;
    }
    for (table, before) in targets.iter().zip(before) {
        let after = table_ddl::read(table.relid)?;
        let changes = diff(&before, &after);
        validate_changes(table, &changes)?;
        if changes.is_empty() {
            continue;
        }
        if concurrent {
            run_concurrently(table, &after, &changes)?;
            continue;
        }
        // A column of a user-defined type (added, or changed to one): the nodes get the type.
        let display = quote::qualified(&after.schema, &after.name);
        types::check(&after, &display)?;
        let new_keys = added_foreign_keys(table, &changes)?;
        let changes = with_fixed_defaults(table.relid, changes)?;
        for (node, shards) in shards_by_node(table)?.values() {
            types::ensure_on(&after, node)?;
            let mut statements = Vec::new();
            for shard_id in shards {
                for change in &changes {
                    match change {
                        Change::AddConstraint(constraint) if constraint.kind == 'f' => {
                            let key: Vec<_> = new_keys.iter().filter(|k| k.name == constraint.name).cloned().collect();
                            let shard = NewShard {
                                relid: table.relid,
                                shard_id: *shard_id,
                                interval: table.shards.iter().find(|s| s.shard_id == *shard_id).and_then(|s| s.interval),
                            };
                            statements.extend(foreign_keys::shard_statements(table.relid, &after, &key, &[shard], &[])?);
                        }
                        other => statements.push(other.shard_sql(&after, *shard_id, &quote::ident)),
                    }
                }
            }
            remote::execute(node, &statements.join("; "))?;
        }
    }
    Ok(())
}

/// A column added with a default that is one value for every row but depends on where it is
/// computed (`now()`, `current_user`, ...): PostgreSQL fills the existing rows with the value
/// it computes once, and so do the shards, with the coordinator's value as the column's default
/// while they fill their rows; the default itself follows. Volatile defaults (`random()`,
/// `clock_timestamp()`) are computed per row, on the shards as on one server.
fn with_fixed_defaults(relid: pg_sys::Oid, changes: Vec<Change>) -> Result<Vec<Change>> {
    let mut result = Vec::with_capacity(changes.len());
    for change in changes {
        let Change::AddColumn(column) = &change else {
            result.push(change);
            continue;
        };
        if column.shard_default.is_none() {
            result.push(change);
            continue;
        }
        let tree = crate::catalog::read_one::<String>(
            "SELECT adbin::text FROM pg_catalog.pg_attrdef WHERE adrelid = $1 AND adnum = $2",
            &[relid.into(), column.attnum.into()],
        )?;
        let Some(tree) = tree else {
            result.push(change);
            continue;
        };
        let tree = std::ffi::CString::new(tree).map_err(|e| ShardingError::internal(e.to_string()))?;
        // SAFETY: a node tree PostgreSQL stored for this default; evaluate_expr plans and runs
        // it and returns a Const of the expression's own type.
        let value = unsafe {
            let expression = pg_sys::stringToNode(tree.as_ptr()).cast::<pg_sys::Node>();
            if !pg_sys::contain_mutable_functions(expression) || pg_sys::contain_volatile_functions(expression) {
                result.push(change);
                continue;
            }
            let constant = pg_sys::evaluate_expr(
                expression.cast(),
                pg_sys::exprType(expression),
                pg_sys::exprTypmod(expression),
                pg_sys::exprCollation(expression),
            )
            .cast::<pg_sys::Const>();
            if (*constant).constisnull {
                None
            } else {
                let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo((*constant).consttype, &mut output, &mut varlena);
                let _output = crate::deparse::query::ValueOutput::enter();
                let text = pg_sys::OidOutputFunctionCall(output, (*constant).constvalue);
                Some(CStr::from_ptr(text).to_string_lossy().into_owned())
            }
        };
        let mut filling = column.clone();
        filling.shard_default = Some(match value {
            Some(value) => format!("{}::{}", quote::literal(&value), column.type_sql),
            None => format!("NULL::{}", column.type_sql),
        });
        result.push(Change::AddColumn(filling));
        result.push(Change::SetDefault(column.clone()));
    }
    Ok(result)
}

/// Runs CONCURRENTLY index changes on every shard over autocommit connections. When a shard
/// fails, the shard indexes built so far are dropped again and the error names what to do.
fn run_concurrently(table: &DistributedTable, after: &table_ddl::TableDefinition, changes: &[Change]) -> Result<()> {
    let mut done: Vec<(Node, i64)> = Vec::new();
    for (node, shards) in shards_by_node(table)?.values() {
        let connection = crate::connection::connect_to(node)?;
        for shard_id in shards {
            for change in changes {
                // The coordinator's own placements build in this backend, which cannot run a
                // CONCURRENTLY command inside its transaction: they build plainly.
                let sql = if node.is_coordinator {
                    change.shard_sql(after, *shard_id, &quote::ident)
                } else {
                    change.shard_sql_concurrently(after, *shard_id, &quote::ident)
                };
                if let Err(error) = connection.exec(&sql) {
                    undo_concurrent_indexes(after, changes, &done);
                    return Err(remote::remote_error(node, error).hint(
                        "The coordinator's index was created; DROP INDEX it, fix the cause and run the statement again.",
                    ));
                }
            }
            done.push((node.clone(), *shard_id));
        }
    }
    Ok(())
}

fn undo_concurrent_indexes(after: &table_ddl::TableDefinition, changes: &[Change], done: &[(Node, i64)]) {
    for (node, shard_id) in done {
        let Ok(connection) = crate::connection::connect_to(node) else { continue };
        for change in changes {
            if let Change::CreateIndex(index) = change {
                let drop = Change::DropIndex(index.name.clone());
                let sql = if node.is_coordinator {
                    drop.shard_sql(after, *shard_id, &quote::ident)
                } else {
                    drop.shard_sql_concurrently(after, *shard_id, &quote::ident)
                };
                let _ = connection.exec(&sql);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dropping a distributed table (DROP TABLE, DROP SCHEMA ... CASCADE, DROP OWNED ...)

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut std::ffi::c_void,
) {
    if let Some(previous) = *std::ptr::addr_of!(PREVIOUS_OBJECT_ACCESS) {
        pg_sys::ffi::pg_guard_ffi_boundary(|| previous(access, class_id, object_id, sub_id, arg));
    }
    if access == pg_sys::ObjectAccessType::OAT_DROP
        && class_id == pg_sys::RelationRelationId
        && sub_id == 0
        && cache::extension_active()
    {
        drop_distributed_table(object_id).or_raise();
    }
}

/// Called just before PostgreSQL drops relation `relid`: if it is distributed, its shards are
/// dropped on the workers and its catalog rows removed, in the same distributed transaction.
unsafe fn drop_distributed_table(relid: pg_sys::Oid) -> Result<()> {
    let Some(table) = distributed_by_oid(relid)? else { return Ok(()) };
    let definition = table_ddl::read(relid)?;
    for (node, shards) in shards_by_node(&table)?.values() {
        let names: Vec<String> = shards.iter().map(|id| definition.shard_name(*id, &quote::ident)).collect();
        // CASCADE: the keys of other shards to these (PostgreSQL has dropped the coordinator's
        // keys, or refused the DROP).
        remote::execute(node, &format!("DROP TABLE IF EXISTS {} CASCADE", names.join(", ")))?;
    }
    crate::catalog::as_catalog_owner(|| crate::catalog::tables::delete_table(relid, table.colocation_id))
}
