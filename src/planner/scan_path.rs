//! Scans of distributed tables inside plans PostgreSQL's planner makes.
//!
//! When a statement cannot be sent whole to the shards, the planner plans it as usual and this
//! hook replaces every scan of a distributed table by a ShardScan: the shards filter (with the
//! clauses that mean the same there, see shippable.rs) and project the rows, pruned to the
//! shards the clauses allow, and the coordinator's executor does the rest (joins with anything,
//! aggregates, window functions, sorting) exactly as on a single server.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::deparse::query::{deparse_scan, ScanColumn};
use crate::error::{OrRaise, Result, ShardingError};
use crate::executor::remote_scan::{make_scan, ShardScanPlan};
use crate::planner::{aggregates, pins, shippable};

static mut PREVIOUS_HOOK: pg_sys::set_rel_pathlist_hook_type = None;

static PATH_NAME: &CStr = c"ShardScan";

/// The range table index of the top level's table whose scan also reads each row's ctid and
/// xmin (the first step of chosen_rows.rs), while such a statement is planned; 0 otherwise.
static IDENTIFIED_TARGET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// While alive, the scan of range table entry `rti` of the statement being planned may read
/// the ctid and xmin of the rows it reads: they identify the row versions on their shard.
pub struct IdentifiedTarget(u32);

/// The system columns that identify a row version on its shard: attribute number, name, type.
pub const ROW_IDENTITY: [(i32, &str, pg_sys::Oid); 2] = [
    (pg_sys::SelfItemPointerAttributeNumber, "ctid", pg_sys::TIDOID),
    (pg_sys::MinTransactionIdAttributeNumber, "xmin", pg_sys::XIDOID),
];

impl IdentifiedTarget {
    pub fn set(rti: u32) -> Self {
        IdentifiedTarget(IDENTIFIED_TARGET.swap(rti, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for IdentifiedTarget {
    fn drop(&mut self) {
        IDENTIFIED_TARGET.store(self.0, std::sync::atomic::Ordering::Relaxed);
    }
}


/// Rows assumed for a distributed table when planning joins around its scans.
const ASSUMED_ROWS: f64 = 1_000_000.0;

static mut PATH_METHODS: pg_sys::CustomPathMethods = pg_sys::CustomPathMethods {
    CustomName: PATH_NAME.as_ptr(),
    PlanCustomPath: Some(plan_path),
    ReparameterizeCustomPathByChild: None,
};

pub fn install() {
    // SAFETY: called once from _PG_init while preloading.
    unsafe {
        PREVIOUS_HOOK = pg_sys::set_rel_pathlist_hook;
        pg_sys::set_rel_pathlist_hook = Some(set_rel_pathlist);
    }
}

extern "C-unwind" {
    pub(crate) fn ChangeVarNodes(node: *mut pg_sys::Node, rt_index: i32, new_index: i32, sublevels_up: i32);
}

#[pg_guard]
unsafe extern "C-unwind" fn set_rel_pathlist(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    rti: pg_sys::Index,
    rte: *mut pg_sys::RangeTblEntry,
) {
    if let Some(previous) = PREVIOUS_HOOK {
        previous(root, rel, rti, rte);
    }
    // Task results read by a coordinator query: a base relation, or a member of a UNION ALL
    // (a pushed-down subquery that PostgreSQL pulled up into an append relation).
    if (*rte).rtekind == pg_sys::RTEKind::RTE_FUNCTION
        && matches!((*rel).reloptkind, pg_sys::RelOptKind::RELOPT_BASEREL | pg_sys::RelOptKind::RELOPT_OTHER_MEMBER_REL)
        && cache::extension_active()
        && aggregates::task_results_plan(rte).is_some()
    {
        add_path(rel, 100.0);
        return;
    }
    if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
        || !matches!(
            (*rel).reloptkind,
            pg_sys::RelOptKind::RELOPT_BASEREL | pg_sys::RelOptKind::RELOPT_OTHER_MEMBER_REL
        )
        || !cache::extension_active()
    {
        return;
    }
    let Some(table) = cache::table_unless_reentrant((*rte).relid).or_raise() else { return };
    if table.method != Method::Hash {
        return;
    }
    if !(*rte).tablesample.is_null() {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("TABLESAMPLE on distributed table \"{}\" is not supported", table.name),
        )
        .raise();
    }
    for mark in list_pointers::<pg_sys::PlanRowMark>((*root).rowMarks) {
        if (*mark).rti == rti {
            ShardingError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("row locks on distributed table \"{}\" are supported only when the statement targets one shard", table.name),
            )
            .detail("This covers SELECT ... FOR UPDATE/SHARE and UPDATE/DELETE of other tables reading it.")
            .hint(format!("Filter on the distribution column \"{}\" with one value.", table.distribution_column.clone().unwrap_or_default()))
            .raise();
        }
    }
    // The coordinator's own table is empty, so its statistics say nothing: size the scan from
    // an assumed table size and the selectivity of its conditions, so that joins get hash or
    // merge plans rather than nested loops built on "one row".
    let selectivity = pg_sys::clauselist_selectivity(
        root,
        (*rel).baserestrictinfo,
        0,
        pg_sys::JoinType::JOIN_INNER,
        std::ptr::null_mut(),
    );
    (*rel).tuples = ASSUMED_ROWS;
    (*rel).rows = (ASSUMED_ROWS * selectivity).clamp(1.0, ASSUMED_ROWS).round();
    add_path(rel, table.shards.len().max(1) as f64);
}

/// Makes a ShardScan the only way to scan `rel`. Shards work in parallel: a scan costs about
/// what one shard's part costs, plus a round trip; the figures only steer join order and
/// join methods.
unsafe fn add_path(rel: *mut pg_sys::RelOptInfo, shards: f64) {
    let path: *mut pg_sys::CustomPath = pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomPath>()).cast();
    (*path).path.type_ = pg_sys::NodeTag::T_CustomPath;
    (*path).path.pathtype = pg_sys::NodeTag::T_CustomScan;
    (*path).path.parent = rel;
    (*path).path.pathtarget = (*rel).reltarget;
    (*path).path.rows = (*rel).rows;
    (*path).path.startup_cost = 100.0;
    (*path).path.total_cost = 100.0 + (*rel).rows * (*std::ptr::addr_of!(pg_sys::cpu_tuple_cost)) * (1.0 + 2.0 / shards);
    (*path).flags = 0;
    (*path).methods = std::ptr::addr_of!(PATH_METHODS);
    // The coordinator's own (empty) table must never be scanned, nor in parallel workers.
    (*rel).pathlist = std::ptr::null_mut();
    (*rel).partial_pathlist = std::ptr::null_mut();
    (*rel).consider_parallel = false;
    pg_sys::add_path(rel, path.cast());
}

#[pg_guard]
unsafe extern "C-unwind" fn plan_path(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    _best_path: *mut pg_sys::CustomPath,
    tlist: *mut pg_sys::List,
    clauses: *mut pg_sys::List,
    _custom_plans: *mut pg_sys::List,
) -> *mut pg_sys::Plan {
    build_scan(root, rel, tlist, clauses).or_raise().cast()
}

unsafe fn build_scan(
    root: *mut pg_sys::PlannerInfo,
    rel: *mut pg_sys::RelOptInfo,
    tlist: *mut pg_sys::List,
    clauses: *mut pg_sys::List,
) -> Result<*mut pg_sys::CustomScan> {
    let rti = (*rel).relid;
    let rte = *(*root).simple_rte_array.add(rti as usize);
    if let Some(plan) = aggregates::task_results_plan(rte) {
        return results_scan(rte, rti, &plan, tlist, clauses);
    }
    let rte_relid = (*rte).relid;
    let identified = (*root).query_level == 1 && rti == IDENTIFIED_TARGET.load(std::sync::atomic::Ordering::Relaxed);
    let table = cache::table(rte_relid)?.ok_or_else(|| ShardingError::internal("ShardScan of a table that is not distributed"))?;

    let mut remote: Vec<*mut pg_sys::Node> = Vec::new();
    let mut local: *mut pg_sys::List = std::ptr::null_mut();
    let infos: Vec<*mut pg_sys::RestrictInfo> =
        list_pointers::<pg_sys::RestrictInfo>(clauses).into_iter().filter(|i| !(**i).pseudoconstant).collect();
    let ships = |info: *mut pg_sys::RestrictInfo| shippable::shippable_over((*info).clause.cast(), shippable::Rules { whole_statement: false, row_identity: false }, rte_relid);
    // Row-level security: a condition that could leak values (a division by zero telling a
    // hidden row's value, say) must see only the rows the policies let through. A shard
    // evaluates the conditions it gets in any order, so such a condition is sent only when no
    // condition of a lower security level exists; otherwise it is evaluated here, after the
    // shards applied the policies.
    let lowest = infos.iter().map(|&i| (*i).security_level).min();
    for info in infos {
        let clause = (*info).clause.cast::<pg_sys::Node>();
        let leak_safe = (*info).leakproof || lowest.is_none_or(|low| (*info).security_level <= low);
        if ships(info) && leak_safe {
            remote.push(clause);
        } else {
            local = pg_sys::lappend(local, clause.cast());
        }
    }

    // Columns the coordinator needs: those of the scan's output and of the clauses kept here.
    // The output is `tlist` (the path's target), not the relation's current target: when the
    // relation alone is the query's scan/join relation (a LEFT JOIN removed as useless, say),
    // PostgreSQL has replaced its target with the final one by now, which may lack columns
    // the path's target still carries.
    let mut attrs: *mut pg_sys::Bitmapset = std::ptr::null_mut();
    pg_sys::pull_varattnos(tlist.cast(), rti, &mut attrs);
    pg_sys::pull_varattnos(local.cast(), rti, &mut attrs);
    let offset = pg_sys::FirstLowInvalidHeapAttributeNumber;
    let mut attnos: Vec<i16> = Vec::new();
    let mut member = -1;
    loop {
        member = pg_sys::bms_next_member(attrs, member);
        if member < 0 {
            break;
        }
        let attno = (member + offset) as i16;
        if identified && ROW_IDENTITY.iter().any(|&(column, _, _)| column == attno as i32) {
            attnos.push(attno);
            continue;
        }
        if attno < 0 && attno as i32 != pg_sys::TableOidAttributeNumber {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("system columns of distributed table \"{}\" are not supported in this query", table.name),
            )
            .detail("A row's ctid, xmin, xmax, cmin and cmax are those of its shard, on its worker.")
            .hint("Name the columns instead."));
        }
        attnos.push(attno);
    }

    if attnos.is_empty() {
        // Only the row count matters (count(*)): fetch the narrowest thing every row has.
        attnos.push(table.distribution_attnum.unwrap_or(1));
    }
    let relation = pg_sys::RelationIdGetRelation(rte_relid);
    if relation.is_null() {
        return Err(ShardingError::internal("could not open a distributed table"));
    }
    let tupdesc = (*relation).rd_att;
    let mut names = Vec::new();
    let mut scan_tlist: *mut pg_sys::List = std::ptr::null_mut();
    let mut binary = true;
    let builtin = |attr: *const pg_sys::FormData_pg_attribute| (*attr).atttypid.to_u32() < pg_sys::FirstNormalObjectId;
    for (i, &attno) in attnos.iter().enumerate() {
        let var = if let Some(&(_, name, type_oid)) = ROW_IDENTITY.iter().find(|&&(column, _, _)| column == attno as i32) {
            names.push(ScanColumn::Column(name.to_owned()));
            pg_sys::makeVar(rti as i32, attno, type_oid, -1, pg_sys::InvalidOid, 0)
        } else if attno as i32 == pg_sys::TableOidAttributeNumber {
            // The coordinator's table, as on a single server.
            names.push(ScanColumn::Oid(rte_relid.to_u32()));
            pg_sys::makeVar(rti as i32, attno, pg_sys::OIDOID, -1, pg_sys::InvalidOid, 0)
        } else if attno == 0 {
            // The whole row: its columns travel as an anonymous row, which the coordinator
            // reads as the table's row type (dropped columns are in neither's text or binary
            // form). In binary, each column's type oid must match: built-in types only.
            let mut columns = Vec::new();
            for k in 0..(*tupdesc).natts as usize {
                let attr = (*tupdesc).attrs.as_ptr().add(k);
                if !(*attr).attisdropped {
                    columns.push(CStr::from_ptr((*attr).attname.data.as_ptr()).to_string_lossy().into_owned());
                    binary &= builtin(attr);
                }
            }
            names.push(ScanColumn::Row(columns));
            pg_sys::makeVar(rti as i32, 0, (*relation).rd_rel.as_ref().map_or(pg_sys::InvalidOid, |r| r.reltype), -1, pg_sys::InvalidOid, 0)
        } else {
            let attr = (*tupdesc).attrs.as_ptr().add(attno as usize - 1);
            names.push(ScanColumn::Column(CStr::from_ptr((*attr).attname.data.as_ptr()).to_string_lossy().into_owned()));
            binary &= shippable::binary_transportable((*attr).atttypid);
            pg_sys::makeVar(rti as i32, attno, (*attr).atttypid, (*attr).atttypmod, (*attr).attcollation, 0)
        };
        let entry = pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, std::ptr::null_mut(), false);
        scan_tlist = pg_sys::lappend(scan_tlist, entry.cast());
    }
    pg_sys::RelationClose(relation);

    let pins = pins::scan_pins(&table, rti as i32, &remote);
    let mut exprs = Vec::new();
    let mut prune = Vec::new();
    for disjunction in pins {
        let mut indexes = Vec::new();
        for (value, is_array) in disjunction {
            indexes.push((exprs.len(), is_array));
            exprs.push(pg_sys::copyObjectImpl(value.cast()).cast::<pg_sys::Node>());
        }
        prune.push(indexes);
    }

    let mut renumbered = Vec::new();
    let mut params_used = Vec::new();
    for &clause in &remote {
        let copy: *mut pg_sys::Node = pg_sys::copyObjectImpl(clause.cast()).cast();
        ChangeVarNodes(copy, rti as i32, 1, 0);
        collect_params(copy, &mut params_used);
        renumbered.push(copy);
    }
    let deparsed = deparse_scan(rte_relid, &names, &renumbered)?;
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, rte_relid);
    // Read with its view owner's rights when read through a view (as PostgreSQL does).
    plan.run_as = (*rte).checkAsUser.to_u32();
    plan.prune = prune;
    plan.binary = binary;
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    make_scan(&plan, exprs, rti, tlist, scan_tlist, local)
}

/// The ShardScan reading the tasks of a split aggregation (aggregates.rs): its columns are the
/// function RTE's.
unsafe fn results_scan(
    rte: *mut pg_sys::RangeTblEntry,
    rti: u32,
    plan: &ShardScanPlan,
    tlist: *mut pg_sys::List,
    clauses: *mut pg_sys::List,
) -> Result<*mut pg_sys::CustomScan> {
    let function = list_pointers::<pg_sys::RangeTblFunction>((*rte).functions)[0];
    let types = crate::commands::utility::oid_list((*function).funccoltypes);
    let typmods = crate::commands::utility::int_list((*function).funccoltypmods);
    let collations = crate::commands::utility::oid_list((*function).funccolcollations);
    let mut scan_tlist: *mut pg_sys::List = std::ptr::null_mut();
    for (i, typ) in types.iter().enumerate() {
        let var = pg_sys::makeVar(rti as i32, (i + 1) as i16, *typ, typmods[i], collations[i], 0);
        scan_tlist = pg_sys::lappend(scan_tlist, pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, std::ptr::null_mut(), false).cast());
    }
    let mut local: *mut pg_sys::List = std::ptr::null_mut();
    for info in list_pointers::<pg_sys::RestrictInfo>(clauses) {
        if !(*info).pseudoconstant {
            local = pg_sys::lappend(local, (*info).clause.cast());
        }
    }
    let exprs = plan
        .prune_nodes
        .iter()
        .map(|text| {
            let text = CString::new(text.as_str()).unwrap_or_default();
            pg_sys::stringToNode(text.as_ptr()).cast::<pg_sys::Node>()
        })
        .collect();
    make_scan(plan, exprs, 0, tlist, scan_tlist, local)
}

/// Ids of the external parameters (`$n`) in `node`.
pub unsafe fn collect_params(node: *mut pg_sys::Node, ids: &mut Vec<i32>) {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let ids = &mut *(context as *mut Vec<i32>);
        match (*node).type_ {
            pg_sys::NodeTag::T_Param => {
                let param = node.cast::<pg_sys::Param>();
                if (*param).paramkind == pg_sys::ParamKind::PARAM_EXTERN && !ids.contains(&(*param).paramid) {
                    ids.push((*param).paramid);
                }
                false
            }
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0),
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    walker(node, (ids as *mut Vec<i32>).cast());
}
