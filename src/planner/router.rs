//! Statements sent whole to the shards: SELECTs pinned to one shard group (router queries),
//! and UPDATE/DELETE of a distributed table (one shard when pinned, every shard otherwise).
//!
//! The analysis walks every query level of the statement (subqueries, CTEs, sublinks) and
//! records the tables it reads and the equalities its predicates guarantee (pins.rs,
//! sharding_core::pinning). A statement qualifies when every distributed table in it lies in
//! one equivalence class of distribution columns that holds a value: every row any part of the
//! statement can see then lives in that value's shard group, so running the whole statement
//! there gives exactly the single-server answer.

use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::pinning::Pinning;

use crate::catalog::{cache, tables::DistributedTable, tables::Method};
use crate::commands::utility::list_pointers;
use crate::deparse::query::deparse_query;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::{make_scan, ShardScanPlan};
use crate::planner::pins::{equality_sides, hashes_like, is_pin_value, strip_relabel};
use crate::planner::scan_path::collect_params;
use crate::planner::shippable;

/// A distribution column occurrence: (query level id, range table index, attribute number).
type Key = (usize, u32, i16);

#[derive(Default)]
struct Analysis {
    pinning: Pinning<Key, usize>,
    /// The facts of the top query level alone. Facts found inside a subquery restrict the
    /// subquery's rows for each outer row, never the outer rows themselves (think of
    /// `NOT EXISTS (SELECT ... WHERE o.user_id = 5 AND o.user_id = u.id)`): the top level's
    /// tables are judged by this one.
    top: Pinning<Key, usize>,
    values: Vec<*mut pg_sys::Node>,
    dist_keys: Vec<Key>,
    tables: Vec<Rc<DistributedTable>>,
    /// Some relation is neither distributed nor a reference table: it lives only here.
    local: bool,
    /// A reference table whose rows the statement locks (FOR UPDATE/SHARE).
    locked_reference: Option<String>,
    /// Reads a trigger's transition table, which only this backend's executor can scan (and
    /// ruleutils cannot print).
    transition_table: bool,
    /// Some relation carries row-level security quals (which the deparser does not print).
    row_security: bool,
    /// Some level locks rows (FOR UPDATE/SHARE).
    locks_rows: bool,
    next_level: usize,
    /// Query levels being analysed, innermost last: (level id, query).
    stack: Vec<(usize, *mut pg_sys::Query)>,
    failure: Option<ShardingError>,
}

impl Analysis {
    unsafe fn query(&mut self, query: *mut pg_sys::Query) -> Result<()> {
        let level = self.next_level;
        self.next_level += 1;
        if !(*query).rowMarks.is_null() {
            self.locks_rows = true;
        }
        self.stack.push((level, query));
        for (i, rte) in list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).into_iter().enumerate() {
            if !(*rte).securityQuals.is_null() {
                self.row_security = true;
            }
            match (*rte).rtekind {
                pg_sys::RTEKind::RTE_RELATION => {
                    if (*rte).relkind == pg_sys::RELKIND_VIEW as std::ffi::c_char {
                        continue; // kept for permission checks only; its query is expanded
                    }
                    match cache::table_unless_reentrant((*rte).relid)? {
                        Some(table) if table.method == Method::Hash => {
                            // Also where it would reach the shards inside a pushed-down subquery:
                            // a method returning a number of rows would return it per shard.
                            if !(*rte).tablesample.is_null() {
                                return Err(unsupported(format!("TABLESAMPLE on distributed table \"{}\" is not supported", table.name)));
                            }
                            let attno = table.distribution_attnum.unwrap_or(0);
                            self.dist_keys.push((level, (i + 1) as u32, attno));
                            if !self.tables.iter().any(|t| t.relid == table.relid) {
                                self.tables.push(table);
                            }
                        }
                        Some(table) => {
                            // A reference table's row locks: they would be taken on the
                            // workers' copies, which the coordinator's own reads and locks of it
                            // do not see.
                            let marks = list_pointers::<pg_sys::RowMarkClause>((*query).rowMarks);
                            if marks.iter().any(|&mark| (*mark).rti as usize == i + 1) {
                                self.locked_reference = Some(table.name.clone());
                            }
                        }
                        None => self.local = true,
                    }
                }
                pg_sys::RTEKind::RTE_SUBQUERY => self.query((*rte).subquery)?,
                // A trigger's transition table: rows only this backend has, like a local table's.
                pg_sys::RTEKind::RTE_NAMEDTUPLESTORE => {
                    self.local = true;
                    self.transition_table = true;
                }
                _ => {}
            }
        }
        for cte in list_pointers::<pg_sys::CommonTableExpr>((*query).cteList) {
            self.query((*cte).ctequery.cast())?;
        }
        // Sublinks anywhere in this level's expressions.
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn sublinks(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
            if node.is_null() {
                return false;
            }
            let analysis = &mut *(context as *mut Analysis);
            if (*node).type_ == pg_sys::NodeTag::T_SubLink {
                let sublink = node.cast::<pg_sys::SubLink>();
                let inner_level = analysis.next_level;
                if let Err(error) = analysis.query((*sublink).subselect.cast()) {
                    analysis.failure = Some(error);
                    return true;
                }
                analysis.in_sublink_edge(sublink, inner_level);
                return sublinks((*sublink).testexpr, context);
            }
            if (*node).type_ == pg_sys::NodeTag::T_Query {
                return false;
            }
            pg_sys::expression_tree_walker(node, Some(sublinks), context)
        }
        let flags = (pg_sys::QTW_IGNORE_RT_SUBQUERIES | pg_sys::QTW_IGNORE_CTE_SUBQUERIES) as i32;
        pg_sys::query_tree_walker(query, Some(sublinks), (self as *mut Analysis).cast(), flags);
        if let Some(error) = self.failure.take() {
            return Err(error);
        }
        self.predicates((*query).jointree.cast(), true);
        self.stack.pop();
        Ok(())
    }

    /// The values pinning every key to one shard group: the top level's keys by the top level's
    /// own facts, the others tied to them by any facts.
    fn pinned_group(&mut self, keys: &[Key]) -> Option<Vec<usize>> {
        let top_keys: Vec<Key> = keys.iter().copied().filter(|(level, _, _)| *level == 0).collect();
        if top_keys.is_empty() {
            return self.pinning.single_group(keys);
        }
        let values = self.top.single_group(&top_keys)?;
        self.pinning.connected(keys).then_some(values)
    }

    /// Whether every key lies in one class, the top level's keys by the top level's own facts.
    fn connected(&mut self, keys: &[Key]) -> bool {
        let top_keys: Vec<Key> = keys.iter().copied().filter(|(level, _, _)| *level == 0).collect();
        (top_keys.len() <= 1 || self.top.connected(&top_keys)) && (keys.len() <= 1 || self.pinning.connected(keys))
    }

    /// `x IN (SELECT y ...)` with distribution columns on both sides: for every row the test
    /// can be true for, x = y, like a join condition.
    unsafe fn in_sublink_edge(&mut self, sublink: *mut pg_sys::SubLink, inner_level: usize) {
        if (*sublink).subLinkType != pg_sys::SubLinkType::ANY_SUBLINK {
            return;
        }
        let Some((outer, inner)) = equality_sides((*sublink).testexpr) else { return };
        let (outer, param) = if (*inner).type_ == pg_sys::NodeTag::T_Param { (outer, inner) } else { (inner, outer) };
        if (*param).type_ != pg_sys::NodeTag::T_Param
            || (*param.cast::<pg_sys::Param>()).paramkind != pg_sys::ParamKind::PARAM_SUBLINK
            || (*param.cast::<pg_sys::Param>()).paramid != 1
        {
            return;
        }
        let Some((outer_key, _)) = self.key_of(outer) else { return };
        let query = (*sublink).subselect.cast::<pg_sys::Query>();
        // The subquery's rows must be the union of what each shard group gives: no step that
        // looks at the rows of several groups together (`ORDER BY v LIMIT 1` keeps one row in
        // all, not one per group).
        if !(*query).limitCount.is_null()
            || !(*query).limitOffset.is_null()
            || (*query).hasDistinctOn
            || (*query).hasWindowFuncs
            || !(*query).groupingSets.is_null()
            || !(*query).setOperations.is_null()
        {
            return;
        }
        let Some(&first) = list_pointers::<pg_sys::TargetEntry>((*query).targetList).first() else { return };
        // The subquery's column, resolved at its own level.
        self.stack.push((inner_level, query));
        let inner_key = self.key_of((*first).expr.cast());
        self.stack.pop();
        if let Some((inner_key, _)) = inner_key {
            self.pinning.equal(&outer_key, &inner_key);
        }
    }

    /// Records the facts of a join tree's conditions. `top`: the rows of this subtree reach
    /// the level's output unchanged (only inner joins above), so value pins hold for them.
    unsafe fn predicates(&mut self, node: *mut pg_sys::Node, top: bool) {
        if node.is_null() {
            return;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_FromExpr => {
                let from = node.cast::<pg_sys::FromExpr>();
                self.conjuncts((*from).quals, top);
                for item in list_pointers::<pg_sys::Node>((*from).fromlist) {
                    self.predicates(item, top);
                }
            }
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                use pg_sys::JoinType::*;
                let inner = (*join).jointype == JOIN_INNER;
                self.conjuncts((*join).quals, top && inner);
                let (left_top, right_top) = match (*join).jointype {
                    JOIN_INNER => (top, top),
                    JOIN_LEFT => (top, false),
                    JOIN_RIGHT => (false, top),
                    _ => (false, false),
                };
                self.predicates((*join).larg, left_top);
                self.predicates((*join).rarg, right_top);
            }
            _ => {}
        }
    }

    unsafe fn conjuncts(&mut self, node: *mut pg_sys::Node, pins_hold: bool) {
        if node.is_null() {
            return;
        }
        if (*node).type_ == pg_sys::NodeTag::T_BoolExpr
            && (*node.cast::<pg_sys::BoolExpr>()).boolop == pg_sys::BoolExprType::AND_EXPR
        {
            for arg in list_pointers::<pg_sys::Node>((*node.cast::<pg_sys::BoolExpr>()).args) {
                self.conjuncts(arg, pins_hold);
            }
            return;
        }
        if (*node).type_ == pg_sys::NodeTag::T_List {
            for arg in list_pointers::<pg_sys::Node>(node.cast()) {
                self.conjuncts(arg, pins_hold);
            }
            return;
        }
        let Some((left, right)) = equality_sides(node) else { return };
        match (self.key_of(left), self.key_of(right)) {
            (Some((a, _)), Some((b, _))) => {
                self.pinning.equal(&a, &b);
                if self.stack.len() == 1 {
                    self.top.equal(&a, &b);
                }
            }
            (Some((key, table)), None) | (None, Some((key, table))) if pins_hold => {
                let value = if self.key_of(left).is_some() { right } else { left };
                if is_pin_value(value) && hashes_like(&table, pg_sys::exprType(value)) {
                    self.values.push(value);
                    self.pinning.pin(&key, self.values.len() - 1);
                    if self.stack.len() == 1 {
                        self.top.pin(&key, self.values.len() - 1);
                    }
                }
            }
            _ => {}
        }
    }

    /// The distribution column a Var stands for (following join aliases), with its table.
    unsafe fn key_of(&self, node: *mut pg_sys::Node) -> Option<(Key, Rc<DistributedTable>)> {
        let node = strip_relabel(node);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Var {
            return None;
        }
        let var = node.cast::<pg_sys::Var>();
        let depth = (*var).varlevelsup as usize;
        if depth >= self.stack.len() || (*var).varattno <= 0 {
            return None;
        }
        let (level, query) = self.stack[self.stack.len() - 1 - depth];
        let rtes = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable);
        let rte = *rtes.get((*var).varno as usize - 1)?;
        match (*rte).rtekind {
            pg_sys::RTEKind::RTE_RELATION => {
                let table = cache::table_unless_reentrant((*rte).relid).ok()??;
                (table.method == Method::Hash && table.distribution_attnum == Some((*var).varattno))
                    .then(|| ((level, (*var).varno as u32, (*var).varattno), table))
            }
            pg_sys::RTEKind::RTE_JOIN => {
                let aliases = list_pointers::<pg_sys::Node>((*rte).joinaliasvars);
                let target = strip_relabel(*aliases.get((*var).varattno as usize - 1)?);
                if target.is_null() || (*target).type_ != pg_sys::NodeTag::T_Var {
                    return None;
                }
                // Join alias Vars are of the same level as the join.
                let mut inner = *target.cast::<pg_sys::Var>();
                inner.varlevelsup = (*var).varlevelsup;
                self.key_of((&mut inner as *mut pg_sys::Var).cast())
            }
            _ => None,
        }
    }
}

/// When the distribution columns are pinned in separate classes (no join between them), the
/// statement still runs on one shard group if every class is pinned by constants that all fall
/// into the same shard: then the first of them names it.
unsafe fn same_shard_constants(analysis: &mut Analysis, keys: &[Key]) -> Option<Vec<usize>> {
    let (top_keys, inner_keys): (Vec<Key>, Vec<Key>) = keys.iter().partition(|(level, _, _)| *level == 0);
    let mut per_key = analysis.top.values_per_key(&top_keys).unwrap_or_default();
    if per_key.len() != top_keys.len() {
        return None;
    }
    per_key.extend(analysis.pinning.values_per_key(&inner_keys).unwrap_or_default());
    if per_key.len() != keys.len() || per_key.is_empty() {
        return None;
    }
    let anchor = analysis.tables.first()?.clone();
    let mut shard = None;
    for value in per_key.iter().flatten() {
        let node = analysis.values[*value];
        if (*node).type_ != pg_sys::NodeTag::T_Const {
            return None;
        }
        let constant = node.cast::<pg_sys::Const>();
        let kind = crate::routing::DistKind::hashing(anchor.distribution_kind, crate::routing::DistKind::of_type((*constant).consttype)?);
        let hash = crate::routing::hash_datum((*constant).constvalue, kind);
        let index = anchor.shards.iter().position(|s| s.interval.is_some_and(|i| i.contains(hash)))?;
        if *shard.get_or_insert(index) != index {
            return None;
        }
    }
    Some(vec![per_key[0][0]])
}

/// Whether running the statement's joins per shard group keeps every row exactly once: no
/// outer join may preserve rows of a side without distributed tables against a side with them
/// (each shard group would add the same unmatched rows again).
unsafe fn outer_joins_keep_rows_in_groups(parse: *mut pg_sys::Query, analysis: &Analysis) -> bool {
    unsafe fn has_distributed(node: *mut pg_sys::Node, parse: *mut pg_sys::Query, analysis: &Analysis) -> bool {
        if node.is_null() {
            return false;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblRef => {
                let index = (*node.cast::<pg_sys::RangeTblRef>()).rtindex as u32;
                analysis.dist_keys.iter().any(|(level, rti, _)| *level == 0 && *rti == index)
            }
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                has_distributed((*join).larg, parse, analysis) || has_distributed((*join).rarg, parse, analysis)
            }
            pg_sys::NodeTag::T_FromExpr => list_pointers::<pg_sys::Node>((*node.cast::<pg_sys::FromExpr>()).fromlist)
                .into_iter()
                .any(|item| has_distributed(item, parse, analysis)),
            _ => true,
        }
    }
    unsafe fn safe(node: *mut pg_sys::Node, parse: *mut pg_sys::Query, analysis: &Analysis) -> bool {
        if node.is_null() {
            return true;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                let (left, right) = (has_distributed((*join).larg, parse, analysis), has_distributed((*join).rarg, parse, analysis));
                use pg_sys::JoinType::*;
                let ok = match (*join).jointype {
                    JOIN_INNER => true,
                    JOIN_LEFT => left || !right,
                    JOIN_RIGHT => right || !left,
                    _ => left == right,
                };
                ok && safe((*join).larg, parse, analysis) && safe((*join).rarg, parse, analysis)
            }
            pg_sys::NodeTag::T_FromExpr => list_pointers::<pg_sys::Node>((*node.cast::<pg_sys::FromExpr>()).fromlist)
                .into_iter()
                .all(|item| safe(item, parse, analysis)),
            _ => true,
        }
    }
    safe((*parse).jointree.cast(), parse, analysis)
}

/// Output columns of a statement: the non-junk entries of `list`.
unsafe fn output_columns(list: *mut pg_sys::List) -> Vec<*mut pg_sys::TargetEntry> {
    list_pointers::<pg_sys::TargetEntry>(list).into_iter().filter(|e| !(**e).resjunk).collect()
}

/// Whether values of this type can come back from a worker (as text or binary).
unsafe fn receivable(type_oid: pg_sys::Oid) -> bool {
    type_oid != pg_sys::RECORDOID && pg_sys::get_typtype(type_oid) != pg_sys::TYPTYPE_PSEUDO as std::ffi::c_char
}

fn unsupported(message: impl Into<String>) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message)
}

/// A plan for `parse` sent whole to the shards, `None` when PostgreSQL's planner (with
/// ShardScans for the distributed tables) should plan it.
pub unsafe fn plan_statement(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    use pg_sys::CmdType::*;
    let command = (*parse).commandType;
    if command == CMD_INSERT && (*parse).utilityStmt.is_null() {
        if (*parse).hasModifyingCTE && modifies_distributed_tables(parse)? {
            match insert_from_modifying_ctes(parse, query_string, cursor_options, bound_params) {
                Ok(planned) => return Ok(Some(planned)),
                // Not on one shard group: the WITH queries run first (modifying_ctes.rs).
                Err(error) if error.code == PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED => {
                    let original: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
                    if !super::modifying_ctes::separate(parse)? {
                        return Err(error);
                    }
                    return plan_separated(parse, original, query_string, cursor_options, bound_params);
                }
                Err(error) => return Err(error),
            }
        }
        if let Some(planned) = insert_select(parse)? {
            return Ok(Some(planned));
        }
        // Through the coordinator: the SELECT (and its subqueries) may still aggregate on the
        // shards, e.g. INSERT INTO summary SELECT region, count(*) FROM users GROUP BY region.
        if (*parse).hasModifyingCTE {
            return Ok(None);
        }
        return push_down_subqueries(parse, query_string, cursor_options, bound_params);
    }
    if command == CMD_MERGE && (*parse).utilityStmt.is_null() {
        return merge(parse);
    }
    if !matches!(command, CMD_SELECT | CMD_UPDATE | CMD_DELETE) || !(*parse).utilityStmt.is_null() {
        return Ok(None);
    }
    // Conditions on the columns of views and subqueries in FROM go into them too, where they
    // can pin the statement to one shard group (`SELECT * FROM a_view WHERE id = 3`).
    if command == CMD_SELECT {
        super::outer_conditions::push_into_subqueries(parse);
    }
    let mut analysis = Analysis::default();
    analysis.query(parse)?;
    let modify = command != CMD_SELECT;
    if modify {
        let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
        let rte = rtes[(*parse).resultRelation as usize - 1];
        if let Some(table) = cache::table_unless_reentrant((*rte).relid)? {
            if table.method == Method::Reference {
                return reference_write(parse, &analysis, &table, query_string, cursor_options, bound_params).map(Some);
            }
        }
    }
    if analysis.tables.is_empty() {
        // Data-modifying WITH queries on reference tables run first (modifying_ctes.rs).
        if (*parse).hasModifyingCTE && modifies_distributed_tables(parse)? {
            let original: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
            if super::modifying_ctes::separate(parse)? {
                return plan_separated(parse, original, query_string, cursor_options, bound_params);
            }
        }
        return Ok(None);
    }
    if let Some(reference) = &analysis.locked_reference {
        return Err(unsupported(format!(
            "FOR UPDATE/SHARE of reference table \"{reference}\" in a query with distributed tables is not supported"
        ))
        .detail("The shards would lock the workers' copies of its rows, which the coordinator's copy does not see.")
        .hint("Lock only the distributed tables (FOR UPDATE OF <table>), and the reference table's rows in a statement of their own."));
    }
    if analysis.transition_table {
        if modify {
            return Err(unsupported("UPDATE or DELETE of a distributed table reading a trigger's transition table is not supported")
                .hint("Copy the transition table's rows into a temporary table and read that."));
        }
        // PostgreSQL's plan, reading the distributed tables through ShardScans.
        return Ok(None);
    }
    let target: Option<Rc<DistributedTable>> = if modify {
        let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
        let rte = rtes[(*parse).resultRelation as usize - 1];
        match cache::table_unless_reentrant((*rte).relid)? {
            Some(table) if table.method == Method::Hash => Some(table),
            Some(_) => return Err(ShardingError::internal("reference table writes are planned above")),
            None => {
                // A local table: PostgreSQL's plan, reading through ShardScans.
                super::local_write::wrap_distributed_tables(parse, true)?;
                return Ok(None);
            }
        }
    } else {
        None
    };

    let colocated = analysis.tables.iter().all(|t| t.colocation_id.is_some() && t.colocation_id == analysis.tables[0].colocation_id);
    let keys = analysis.dist_keys.clone();
    // Row-level security quals live on the range table entries, where the deparser does not
    // print them: such statements are planned by PostgreSQL, which applies them here.
    if analysis.row_security {
        if modify {
            return Err(unsupported("UPDATE and DELETE of distributed tables under row-level security are not supported yet"));
        }
        return Ok(None);
    }
    // The new rows would have to be checked against the view's conditions after the workers
    // computed them.
    if modify && !(*parse).withCheckOptions.is_null() {
        return Err(unsupported("UPDATE of a distributed table through a view WITH CHECK OPTION is not supported yet")
            .hint("Update the table itself, with the view's conditions in WHERE."));
    }
    let pinned = if colocated && !analysis.local {
        analysis.pinned_group(&keys).or_else(|| same_shard_constants(&mut analysis, &keys))
    } else {
        None
    };
    // Writes get the coordinator's values of now() and friends as parameters (hoist.rs).
    let mut user_params = Vec::new();
    collect_params(parse.cast(), &mut user_params);
    let first_hoisted = user_params.iter().copied().max().unwrap_or(0) + 1;
    let (mut shipped, mut hoisted) = if modify { super::hoist::hoist(parse, first_hoisted) } else { (parse, Vec::new()) };
    let row_identity = super::chosen_rows::Planning::in_second_step();
    let rules = shippable::Rules { whole_statement: true, row_identity };
    let mut statement_ships = shippable::shippable(shipped.cast(), rules);
    // A RETURNING list the shards cannot evaluate: they return the columns it reads, and the
    // coordinator evaluates it (returning.rs).
    let mut returning_here = None;
    if modify && !statement_ships && !shippable::shippable((*shipped).returningList.cast(), rules) {
        if let Some(read) = super::returning::columns_read(parse) {
            let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
            (*copy).returningList = read.shipped;
            (shipped, hoisted) = super::hoist::hoist(copy, first_hoisted);
            statement_ships = shippable::shippable(shipped.cast(), rules);
            returning_here = Some(read.outputs);
        }
    }
    let outputs = match &returning_here {
        Some(outputs) => outputs.clone(),
        None => output_columns(if modify { (*parse).returningList } else { (*parse).targetList }),
    };
    let outputs_receivable = outputs.iter().all(|e| receivable(pg_sys::exprType((**e).expr.cast())));
    // Data-modifying WITH queries that cannot run with the statement on one shard group run
    // first, as statements of their own (modifying_ctes.rs).
    if (*parse).hasModifyingCTE && !(pinned.is_some() && statement_ships && outputs_receivable && check_modifying_ctes(parse).is_ok()) {
        let original: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
        if super::modifying_ctes::separate(parse)? {
            return plan_separated(parse, original, query_string, cursor_options, bound_params);
        }
    }

    if !modify {
        if pinned.is_none() {
            if let Some(coordinator) = shard_select(parse)? {
                let planned = pg_sys::standard_planner(coordinator, query_string, cursor_options, bound_params);
                append_relations(planned, parse);
                return Ok(Some(planned));
            }
        }
        if pinned.is_none() || !statement_ships || !outputs_receivable {
            // FOR UPDATE/SHARE of local tables only: the distributed tables it reads are read
            // through subqueries, as for a write of a local table (local_write.rs).
            if !(*parse).rowMarks.is_null() {
                super::local_write::wrap_distributed_tables(parse, true)?;
            }
            return push_down_subqueries(parse, query_string, cursor_options, bound_params);
        }
        // Data-modifying WITH queries run whole on the one shard group they are pinned to.
        if (*parse).hasModifyingCTE {
            check_modifying_ctes(parse)?;
        }
    } else {
        let table = target.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        if analysis.local {
            if let Some(planned) = rows_chosen_here(parse, query_string, cursor_options, bound_params)? {
                return Ok(Some(planned));
            }
            return Err(unsupported(format!(
                "UPDATE or DELETE of distributed table \"{table}\" reading tables that are neither distributed nor reference tables is not supported"
            )));
        }
        // Several distributed tables: fine when pinned to one shard group, or when they are all
        // joined on their distribution columns (then each shard group runs the statement).
        if pinned.is_none() && keys.len() > 1 && !(colocated && analysis.connected(&keys)) {
            // Both need a statement the shards can run (no volatile functions per row).
            if statement_ships {
                // The other tables sent to every shard of the target instead (broadcast.rs);
                // or subqueries on them run first, here, and their rows go to every shard of the
                // target (intermediate.rs).
                for rewrite in [super::broadcast::for_modify, super::intermediate::for_modify] {
                    if let Some(planned) = plan_rewritten(parse, rewrite(parse)?, query_string, cursor_options, bound_params)? {
                        return Ok(Some(planned));
                    }
                }
            }
            // The rows to change are chosen here (chosen_rows.rs).
            if let Some(planned) = rows_chosen_here(parse, query_string, cursor_options, bound_params)? {
                return Ok(Some(planned));
            }
            return Err(unsupported(format!(
                "UPDATE or DELETE of distributed table \"{table}\" reading other distributed tables needs every table filtered to one shard group"
            ))
            .hint("Join the tables on their distribution columns (co-located tables), or filter them with a single value."));
        }
        if !statement_ships {
            if let Some(planned) = rows_chosen_here(parse, query_string, cursor_options, bound_params)? {
                return Ok(Some(planned));
            }
            if !(*parse).returningList.is_null() && super::returning::columns_read(parse).is_none() {
                return Err(unsupported(format!(
                    "subqueries in the RETURNING list of an UPDATE or DELETE of distributed table \"{table}\" are not supported"
                ))
                .hint("Return the columns, and run the subqueries in a query around the statement: WITH changed AS (UPDATE ... RETURNING ...) SELECT ... FROM changed."));
            }
            if reads_system_columns(parse) {
                return Err(unsupported(format!(
                    "system columns of distributed table \"{table}\" are not supported in UPDATE or DELETE"
                ))
                .detail("A row's ctid, xmin, xmax, cmin and cmax are those of its shard, on its worker.")
                .hint("Name the columns instead."));
            }
            return Err(unsupported(format!(
                "UPDATE or DELETE of distributed table \"{table}\" with this expression per row is not supported yet"
            ))
            .detail("The new values or the conditions compute, for each row, something only the coordinator can: a volatile function (random(), nextval()), a user-defined function, operator or type (also an extension's), or a value the shards would send back in a form the coordinator cannot read (an array of a type of the shards' own).")
            .hint("Compute the values in a query first (UPDATE ... FROM (SELECT ...)), or use built-in functions."));
        }
        if !outputs_receivable {
            return Err(unsupported("RETURNING of anonymous records from a distributed table is not supported"));
        }
        if (*parse).hasModifyingCTE {
            if pinned.is_none() {
                return Err(unsupported("data-modifying WITH queries on distributed tables are supported only when the statement targets one shard group")
                    .hint("Filter every distributed table of the statement, the WITH queries included, to one distribution column value."));
            }
            check_modifying_ctes(parse)?;
        }
        if let Some(table) = &target {
            let attno = table.distribution_attnum.unwrap_or(0);
            if command == CMD_UPDATE && list_pointers::<pg_sys::TargetEntry>((*parse).targetList).iter().any(|e| (**e).resno == attno && !(**e).resjunk) {
                return Err(unsupported(format!(
                    "cannot change the distribution column \"{}\" of \"{}\"",
                    table.distribution_column.clone().unwrap_or_default(),
                    table.name
                ))
                .detail("The row would have to move to another shard.")
                .hint("DELETE the row and INSERT it with the new value."));
            }
        }
    }

    let deparsed = deparse_query(shipped)?;
    let anchor = target.clone().unwrap_or_else(|| analysis.tables[0].clone());
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, anchor.relid);
    let mut exprs = Vec::new();
    if let Some(values) = &pinned {
        // Any one value names the group (several must all be equal for a row to exist).
        let value = pg_sys::copyObjectImpl(analysis.values[values[0]].cast()).cast::<pg_sys::Node>();
        // Straight from the parse tree: give operators their functions before execution.
        pg_sys::fix_opfuncids(value);
        exprs.push(value);
        plan.prune = vec![vec![(0, false)]];
    }
    let mut params_used = Vec::new();
    collect_params(shipped.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    for (id, expr) in hoisted {
        plan.hoisted.push((id, exprs.len()));
        exprs.push(expr);
    }
    plan.binary = outputs.iter().all(|e| shippable::binary_transportable(pg_sys::exprType((**e).expr.cast())));
    plan.modify = modify;
    // A SELECT with a data-modifying WITH query writes: it runs in the distributed transaction.
    plan.writes = (*parse).hasModifyingCTE;
    plan.locks_rows = analysis.locks_rows;
    plan.at_least_one = !modify;
    let projection = match returning_here {
        Some(_) => super::returning::over_scan_columns((*parse).returningList, &outputs),
        None => std::ptr::null_mut(),
    };
    Ok(Some(planned_statement(parse, &plan, exprs, &outputs, projection)?))
}

/// MERGE: into a distributed table it runs on the shards (merge.rs), into a reference table it
/// is refused; into a local table it is PostgreSQL's plan, the distributed tables it reads
/// read through subqueries (local_write.rs).
unsafe fn merge(parse: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let Some(&target) = ((*parse).resultRelation as usize).checked_sub(1).and_then(|i| rtes.get(i)) else { return Ok(None) };
    if let Some(table) = cache::table_unless_reentrant((*target).relid)? {
        if table.method == Method::Reference {
            return Err(unsupported(format!("MERGE into reference table \"{}\" is not supported", table.name))
                .hint("Use INSERT ... ON CONFLICT, or UPDATE ... FROM and INSERT ... SELECT."));
        }
        return super::merge::plan(parse, &table).map(Some);
    }
    super::local_write::wrap_distributed_tables(parse, false)?;
    Ok(None)
}

/// The plan of `rewritten`, a copy of `parse` that reads `broadcasts` (tables or intermediate
/// results sent to its tasks); `None` when there is no rewrite or it has no distributed plan.
unsafe fn plan_rewritten(
    parse: *mut pg_sys::Query,
    rewritten: Option<(*mut pg_sys::Query, Vec<crate::executor::remote_scan::Broadcast>)>,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    let Some((rewritten, broadcasts)) = rewritten else { return Ok(None) };
    let _rewritten = super::chosen_rows::Planning::rewritten();
    let Some(planned) = plan_statement(rewritten, query_string, cursor_options, bound_params)? else { return Ok(None) };
    crate::executor::remote_scan::add_broadcasts((*planned).planTree, broadcasts)?;
    append_relations(planned, parse);
    Ok(Some(planned))
}

/// An UPDATE or DELETE of a distributed table whose rows the coordinator chooses and the
/// shards change (chosen_rows.rs); `None` when that plan cannot carry the statement, or for a
/// statement this plan must not take (see `chosen_rows::Planning`).
unsafe fn rows_chosen_here(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    if !super::chosen_rows::Planning::allowed() {
        return Ok(None);
    }
    let rewritten = super::chosen_rows::for_modify(parse)?;
    let _planning = super::chosen_rows::Planning::second_step();
    plan_rewritten(parse, rewritten, query_string, cursor_options, bound_params)
}

/// Plan 3 for a SELECT: the coordinator query over the rows of one task per shard group, when
/// every distributed table is co-located with the others and joined to them on distribution
/// columns, each output row comes from one shard group (a distributed table in the top level's
/// FROM, no outer join repeating rows per group), and the statement means the same on the
/// workers. `None` when the SELECT is not of that shape.
unsafe fn split_select(parse: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::Query>> {
    split_select_with(parse, Vec::new())
}

/// Whether an UPDATE or DELETE runs per shard group: its distributed tables are co-located and
/// joined on their distribution columns, or pinned to one group (see `plan_statement`).
pub(super) unsafe fn modify_runs_per_group(parse: *mut pg_sys::Query) -> Result<bool> {
    let mut analysis = Analysis::default();
    analysis.query(parse)?;
    if analysis.local || analysis.row_security {
        return Ok(false);
    }
    let colocated = analysis.tables.iter().all(|t| t.colocation_id.is_some() && t.colocation_id == analysis.tables[0].colocation_id);
    let keys = analysis.dist_keys.clone();
    Ok(keys.len() <= 1 || (colocated && (analysis.connected(&keys) || analysis.pinned_group(&keys).is_some())))
}

/// Plan 3 for a SELECT as it is, or with the tables it joins without co-location broadcast to
/// the shards of the others (planner/broadcast.rs).
unsafe fn shard_select(parse: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::Query>> {
    if let Some(coordinator) = split_select(parse)? {
        return Ok(Some(coordinator));
    }
    if let Some(coordinator) = super::broadcast::plan(parse, &[])? {
        return Ok(Some(coordinator));
    }
    super::intermediate::plan(parse)
}

/// `split_select`, with tables broadcast to every task (planner/broadcast.rs).
pub(super) unsafe fn split_select_with(
    parse: *mut pg_sys::Query,
    broadcasts: Vec<crate::executor::remote_scan::Broadcast>,
) -> Result<Option<*mut pg_sys::Query>> {
    if (*parse).commandType != pg_sys::CmdType::CMD_SELECT || !(*parse).utilityStmt.is_null() {
        return Ok(None);
    }
    let mut analysis = Analysis::default();
    analysis.query(parse)?;
    if analysis.tables.is_empty() || analysis.local || analysis.row_security {
        return Ok(None);
    }
    let colocated = analysis.tables.iter().all(|t| t.colocation_id.is_some() && t.colocation_id == analysis.tables[0].colocation_id);
    let keys = analysis.dist_keys.clone();
    if !colocated
        || !analysis.connected(&keys)
        || !analysis.dist_keys.iter().any(|(level, _, _)| *level == 0)
        || !outer_joins_keep_rows_in_groups(parse, &analysis)
        || !shippable::shippable(parse.cast(), shippable::Rules { whole_statement: true, row_identity: false })
    {
        return Ok(None);
    }
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let distributed: Vec<(u32, Rc<DistributedTable>)> = analysis
        .dist_keys
        .iter()
        .filter(|(level, _, _)| *level == 0)
        .filter_map(|&(_, rti, _)| {
            let relid = (*rtes[rti as usize - 1]).relid;
            analysis.tables.iter().find(|t| t.relid == relid).map(|t| (rti, t.clone()))
        })
        .collect();
    super::aggregates::split(parse, analysis.tables[0].relid, &distributed, broadcasts)
}

/// Plans `parse` after its data-modifying WITH queries became statements of their own
/// (modifying_ctes.rs). The plan lists their tables too (those of `original`), so that a
/// change of one invalidates it.
unsafe fn plan_separated(
    parse: *mut pg_sys::Query,
    original: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    let planned = match plan_statement(parse, query_string, cursor_options, bound_params)? {
        Some(planned) => planned,
        None => {
            let planned = pg_sys::standard_planner(parse, query_string, cursor_options, bound_params);
            super::check_plan(planned)?;
            planned
        }
    };
    append_relations(planned, original);
    // Still a SELECT with data-modifying WITH queries to the portal: it runs to its end at its
    // first fetch (as PostgreSQL's does), never at Bind or in part. (Other statements run
    // whole anyway, and an INSERT's routing reads this flag.)
    if (*planned).commandType == pg_sys::CmdType::CMD_SELECT {
        (*planned).hasModifyingCTE = true;
    }
    Ok(Some(planned))
}

/// Every relation of `original` into a plan made from a rewritten statement: permission checks,
/// locks of cached plans and their invalidation work as for the statement as written.
unsafe fn append_relations(planned: *mut pg_sys::PlannedStmt, original: *mut pg_sys::Query) {
    crate::deparse::query::for_each_rte(original, &mut |rte| {
        if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION {
            (*planned).rtable = pg_sys::lappend((*planned).rtable, pg_sys::copyObjectImpl(rte.cast()));
            (*planned).relationOids = pg_sys::lappend_oid((*planned).relationOids, (*rte).relid);
        }
    });
}

/// The general plan (PostgreSQL's, over ShardScans), with every uncorrelated subquery in FROM
/// and every WITH query that plan 3 can run on the shards replaced by its coordinator query:
/// `WITH t AS (SELECT user_id, sum(amount) FROM orders GROUP BY user_id) SELECT ... FROM t JOIN
/// local_table ...` then aggregates on the shards instead of pulling every order here. `None`
/// when there is nothing to replace (PostgreSQL plans the statement as it is).
unsafe fn push_down_subqueries(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    // The statement stays as written unless something is replaced (on a copy).
    let rewritten: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut replaced = 0;
    replace_subqueries(rewritten, &mut replaced)?;
    if replaced == 0 {
        return Ok(None);
    }
    let planned = pg_sys::standard_planner(rewritten, query_string, cursor_options, bound_params);
    append_relations(planned, parse);
    Ok(Some(planned))
}

unsafe fn replace_subqueries(query: *mut pg_sys::Query, replaced: &mut usize) -> Result<()> {
    for (index, rte) in list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).into_iter().enumerate() {
        if (*rte).rtekind != pg_sys::RTEKind::RTE_SUBQUERY || (*rte).lateral || (*rte).subquery.is_null() {
            continue;
        }
        // A plain view or subquery of one table: PostgreSQL's planner pulls it up into this
        // query, and the table's scan then gets this query's conditions too (pruning by them).
        // (Not under FOR UPDATE/SHARE: the row marks of a pulled-up table need its row
        // identity, which ShardScans do not give.)
        if (*query).rowMarks.is_null() && single_table_pulled_up(rte)? {
            continue;
        }
        // Otherwise this query's conditions on its columns go into it (also kept here).
        let filtered = super::outer_conditions::with_outer_conditions(query, index as i32 + 1);
        if let Some(coordinator) = subquery_on_shards(filtered.unwrap_or((*rte).subquery))? {
            (*rte).subquery = coordinator;
            *replaced += 1;
        } else {
            replace_subqueries((*rte).subquery, replaced)?;
        }
    }
    for cte in list_pointers::<pg_sys::CommonTableExpr>((*query).cteList) {
        let inner = (*cte).ctequery.cast::<pg_sys::Query>();
        if (*cte).cterecursive || inner.is_null() || (*inner).type_ != pg_sys::NodeTag::T_Query {
            continue;
        }
        if let Some(coordinator) = subquery_on_shards(inner)? {
            (*cte).ctequery = coordinator.cast();
            *replaced += 1;
        } else {
            replace_subqueries(inner, replaced)?;
        }
    }
    // Subqueries in expressions (WHERE x IN (SELECT ...), scalar subqueries): the same, when
    // they do not refer to the row of this level.
    struct Context<'a> {
        replaced: &'a mut usize,
        failure: Option<ShardingError>,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn sublinks(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let context = &mut *(context as *mut Context);
        if (*node).type_ == pg_sys::NodeTag::T_SubLink {
            let sublink = node.cast::<pg_sys::SubLink>();
            let inner = (*sublink).subselect.cast::<pg_sys::Query>();
            if !inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query {
                let result = match subquery_on_shards(inner) {
                    Ok(Some(coordinator)) => {
                        (*sublink).subselect = coordinator.cast();
                        *context.replaced += 1;
                        Ok(())
                    }
                    Ok(None) => replace_subqueries(inner, context.replaced),
                    Err(error) => Err(error),
                };
                if let Err(error) = result {
                    context.failure = Some(error);
                    return true;
                }
            }
            return sublinks((*sublink).testexpr, (context as *mut Context).cast());
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(sublinks), (context as *mut Context).cast())
    }
    let mut context = Context { replaced, failure: None };
    let flags = (pg_sys::QTW_IGNORE_RT_SUBQUERIES | pg_sys::QTW_IGNORE_CTE_SUBQUERIES) as i32;
    pg_sys::query_tree_walker(query, Some(sublinks), (&mut context as *mut Context).cast(), flags);
    match context.failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The coordinator query of plan 3 for a subquery that reads nothing from outer levels and
/// keeps its output columns exactly (types, typmods, collations, positions).
/// Whether the subquery of `rte` only reads one distributed or reference table, without
/// anything that keeps PostgreSQL from pulling it up into the query around it (see
/// is_simple_subquery in prepjointree.c): no grouping, aggregates, window functions, sets,
/// DISTINCT, ORDER BY, LIMIT, row locks, WITH, set-returning functions or sublinks, and not a
/// security barrier.
unsafe fn single_table_pulled_up(rte: *mut pg_sys::RangeTblEntry) -> Result<bool> {
    let query = (*rte).subquery;
    if (*rte).security_barrier
        || (*query).commandType != pg_sys::CmdType::CMD_SELECT
        || !(*query).setOperations.is_null()
        || (*query).hasAggs
        || (*query).hasWindowFuncs
        || (*query).hasTargetSRFs
        || (*query).hasSubLinks
        || (*query).hasModifyingCTE
        || (*query).hasForUpdate
        || !(*query).groupClause.is_null()
        || !(*query).groupingSets.is_null()
        || !(*query).havingQual.is_null()
        || !(*query).sortClause.is_null()
        || !(*query).distinctClause.is_null()
        || !(*query).limitOffset.is_null()
        || !(*query).limitCount.is_null()
        || !(*query).rowMarks.is_null()
        || !(*query).cteList.is_null()
        || (*query).jointree.is_null()
    {
        return Ok(false);
    }
    let from = list_pointers::<pg_sys::Node>((*(*query).jointree).fromlist);
    if from.len() != 1 || (*from[0]).type_ != pg_sys::NodeTag::T_RangeTblRef {
        return Ok(false);
    }
    // (A view's query also lists its OLD and NEW entries, outside its FROM.)
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable);
    let Some(&table) = rtes.get((*from[0].cast::<pg_sys::RangeTblRef>()).rtindex as usize - 1) else { return Ok(false) };
    Ok((*table).rtekind == pg_sys::RTEKind::RTE_RELATION && (*table).tablesample.is_null() && cache::table((*table).relid)?.is_some())
}

unsafe fn subquery_on_shards(subquery: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::Query>> {
    if (*subquery).commandType != pg_sys::CmdType::CMD_SELECT || (*subquery).hasModifyingCTE || refers_to_outer_levels(subquery) {
        return Ok(None);
    }
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(subquery.cast()).cast();
    // Only a faster way to the same answer: when it cannot be built, the general plan reads
    // the subquery's tables as it always did.
    let Ok(Some(coordinator)) = shard_select(copy) else { return Ok(None) };
    let before = list_pointers::<pg_sys::TargetEntry>((*subquery).targetList);
    let after = list_pointers::<pg_sys::TargetEntry>((*coordinator).targetList);
    let same = before.len() == after.len()
        && before.iter().zip(&after).all(|(&b, &a)| {
            let (b_expr, a_expr) = ((*b).expr.cast::<pg_sys::Node>(), (*a).expr.cast::<pg_sys::Node>());
            (*b).resno == (*a).resno
                && (*b).resjunk == (*a).resjunk
                && pg_sys::exprType(b_expr) == pg_sys::exprType(a_expr)
                && pg_sys::exprTypmod(b_expr) == pg_sys::exprTypmod(a_expr)
                && pg_sys::exprCollation(b_expr) == pg_sys::exprCollation(a_expr)
        });
    Ok(same.then_some(coordinator))
}

/// Whether a query refers to a level above it: a Var, aggregate, GROUPING or WITH query of an
/// enclosing query.
unsafe fn refers_to_outer_levels(query: *mut pg_sys::Query) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let depth = context as *mut u32;
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => return (*node.cast::<pg_sys::Var>()).varlevelsup > *depth,
            pg_sys::NodeTag::T_Aggref => {
                if (*node.cast::<pg_sys::Aggref>()).agglevelsup > *depth {
                    return true;
                }
            }
            pg_sys::NodeTag::T_GroupingFunc => {
                if (*node.cast::<pg_sys::GroupingFunc>()).agglevelsup > *depth {
                    return true;
                }
            }
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node.cast::<pg_sys::RangeTblEntry>();
                return (*rte).rtekind == pg_sys::RTEKind::RTE_CTE && (*rte).ctelevelsup > *depth;
            }
            pg_sys::NodeTag::T_Query => {
                *depth += 1;
                let found = pg_sys::query_tree_walker(node.cast(), Some(walker), context, pg_sys::QTW_EXAMINE_RTES_BEFORE as i32);
                *depth -= 1;
                return found;
            }
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let mut depth: u32 = 0;
    pg_sys::query_tree_walker(query, Some(walker), (&mut depth as *mut u32).cast(), pg_sys::QTW_EXAMINE_RTES_BEFORE as i32)
}

/// The data-modifying WITH queries of a statement pinned to one shard group, which then runs
/// whole on that group: UPDATE and DELETE of hash-distributed tables (the WHERE clauses pinned
/// them with the rest), never of the distribution column. An INSERT could add rows that belong
/// to another shard, and reference or local tables live elsewhere: refused.
unsafe fn check_modifying_ctes(parse: *mut pg_sys::Query) -> Result<()> {
    use pg_sys::CmdType::*;
    for cte in list_pointers::<pg_sys::CommonTableExpr>((*parse).cteList) {
        let query = (*cte).ctequery.cast::<pg_sys::Query>();
        if query.is_null() || (*query).commandType == CMD_SELECT {
            continue;
        }
        let rtes = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable);
        let Some(&rte) = rtes.get(((*query).resultRelation as usize).wrapping_sub(1)) else {
            return Err(unsupported("this data-modifying WITH query is not supported with distributed tables"));
        };
        let table = cache::table_unless_reentrant((*rte).relid)?;
        let Some(table) = table.filter(|t| t.method == Method::Hash) else {
            return Err(unsupported(
                "data-modifying WITH queries on reference or local tables in a statement on distributed tables are not supported yet",
            ));
        };
        match (*query).commandType {
            CMD_UPDATE => {
                let attno = table.distribution_attnum.unwrap_or(0);
                if list_pointers::<pg_sys::TargetEntry>((*query).targetList).iter().any(|e| (**e).resno == attno && !(**e).resjunk) {
                    return Err(unsupported(format!(
                        "cannot change the distribution column \"{}\" of \"{}\"",
                        table.distribution_column.clone().unwrap_or_default(),
                        table.name
                    ))
                    .detail("The row would have to move to another shard."));
                }
            }
            CMD_DELETE => {}
            _ => {
                return Err(unsupported(format!(
                    "INSERT in a data-modifying WITH query on distributed table \"{}\" is not supported yet",
                    table.name
                ))
                .hint("Run the INSERT as its own statement."))
            }
        }
    }
    Ok(())
}

/// `INSERT INTO t SELECT ... FROM s ...` between co-located tables, with the SELECT's rows for
/// t's distribution column coming from s's: each shard group inserts its own rows, on the
/// worker. Anything else (`None`) goes through the coordinator (executor/insert.rs).
unsafe fn insert_select(parse: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::PlannedStmt>> {
    use pg_sys::CmdType::*;
    if !(*parse).onConflict.is_null() || (*parse).hasModifyingCTE || !(*parse).cteList.is_null() {
        return Ok(None);
    }
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let target_rte = rtes[(*parse).resultRelation as usize - 1];
    let Some(target) = cache::table_unless_reentrant((*target_rte).relid)? else { return Ok(None) };
    if target.method != Method::Hash {
        return Ok(None);
    }
    // Exactly one source: the SELECT, as a subquery entry.
    let sources: Vec<(usize, *mut pg_sys::RangeTblEntry)> = rtes
        .iter()
        .enumerate()
        .filter(|(_, rte)| (***rte).rtekind == pg_sys::RTEKind::RTE_SUBQUERY)
        .map(|(i, rte)| (i + 1, *rte))
        .collect();
    let [(source_index, source)] = sources.as_slice() else { return Ok(None) };
    let select = (**source).subquery;
    // Per shard group, the SELECT must produce exactly its share of the rows: no step that
    // looks at rows of several groups together.
    if (*select).hasAggs
        || (*select).hasSubLinks
        || !(*select).groupClause.is_null()
        || !(*select).distinctClause.is_null()
        || !(*select).limitCount.is_null()
        || !(*select).limitOffset.is_null()
        || (*select).hasWindowFuncs
        || (*select).hasTargetSRFs
        || !(*select).setOperations.is_null()
        || !(*select).cteList.is_null()
        || (*select).hasForUpdate
    {
        return Ok(None);
    }
    let mut analysis = Analysis::default();
    analysis.query(parse)?;
    if analysis.local || analysis.row_security || analysis.tables.iter().any(|t| t.colocation_id != target.colocation_id) {
        return Ok(None);
    }
    // The target's distribution column takes the source's: an edge between them.
    let attno = target.distribution_attnum.unwrap_or(0);
    let Some(entry) = list_pointers::<pg_sys::TargetEntry>((*parse).targetList).into_iter().find(|e| (**e).resno == attno) else {
        return Ok(None);
    };
    let value = strip_relabel((*entry).expr.cast());
    if value.is_null()
        || (*value).type_ != pg_sys::NodeTag::T_Var
        || (*value.cast::<pg_sys::Var>()).varno as usize != *source_index
    {
        return Ok(None);
    }
    let column = (*value.cast::<pg_sys::Var>()).varattno;
    let Some(source_entry) = list_pointers::<pg_sys::TargetEntry>((*select).targetList).into_iter().find(|e| (**e).resno == column) else {
        return Ok(None);
    };
    // The SELECT was analysed as level 1 (the INSERT itself is level 0).
    analysis.stack.push((1, select));
    let source_key = analysis.key_of((*source_entry).expr.cast());
    analysis.stack.pop();
    let Some((source_key, _)) = source_key else { return Ok(None) };
    let target_key = (0usize, (*parse).resultRelation as u32, attno);
    analysis.pinning.equal(&target_key, &source_key);
    let keys = analysis.dist_keys.clone();
    let source_top: Vec<(usize, u32, i16)> = keys.iter().copied().filter(|(level, _, _)| *level == 1).collect();
    if source_top.is_empty()
        || !analysis.connected(&keys)
        || !shippable::shippable(parse.cast(), shippable::Rules { whole_statement: true, row_identity: false })
    {
        return Ok(None);
    }
    let mut source_analysis = Analysis::default();
    source_analysis.query(select)?;
    if !outer_joins_keep_rows_in_groups(select, &source_analysis) {
        return Ok(None);
    }
    let outputs = output_columns((*parse).returningList);
    if !outputs.iter().all(|e| receivable(pg_sys::exprType((**e).expr.cast()))) {
        return Ok(None);
    }
    let deparsed = deparse_query(parse)?;
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, target.relid);
    let mut params_used = Vec::new();
    collect_params(parse.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    plan.binary = outputs.iter().all(|e| shippable::binary_transportable(pg_sys::exprType((**e).expr.cast())));
    plan.modify = true;
    debug_assert!((*parse).commandType == CMD_INSERT);
    Ok(Some(planned_statement(parse, &plan, Vec::new(), &outputs, std::ptr::null_mut())?))
}

/// Whether a WITH query of the statement writes to a distributed or reference table.
unsafe fn modifies_distributed_tables(parse: *mut pg_sys::Query) -> Result<bool> {
    for cte in list_pointers::<pg_sys::CommonTableExpr>((*parse).cteList) {
        let query = (*cte).ctequery.cast::<pg_sys::Query>();
        if query.is_null() || (*query).type_ != pg_sys::NodeTag::T_Query || (*query).commandType == pg_sys::CmdType::CMD_SELECT {
            continue;
        }
        let target = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable)[(*query).resultRelation as usize - 1];
        if cache::table_unless_reentrant((*target).relid)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `WITH moved AS (DELETE FROM t WHERE key = 5 RETURNING *) INSERT INTO u SELECT ... FROM moved`:
/// the SELECT, with the WITH queries, is a statement pinned to one shard group and runs there
/// whole (as a SELECT with data-modifying WITH queries does); the INSERT reads its rows from
/// that task and routes them like any INSERT ... SELECT through the coordinator, in the same
/// distributed transaction. Anything else with such WITH queries is refused.
unsafe fn insert_from_modifying_ctes(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<*mut pg_sys::PlannedStmt> {
    let refuse = || {
        unsupported("INSERT fed by data-modifying WITH queries on distributed tables is supported only as INSERT ... SELECT targeting one shard group")
            .hint("Filter every distributed table of the WITH queries and of the SELECT to one distribution column value.")
    };
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let sources: Vec<usize> =
        rtes.iter().enumerate().filter(|(_, rte)| (***rte).rtekind == pg_sys::RTEKind::RTE_SUBQUERY).map(|(i, _)| i).collect();
    let [source] = sources.as_slice() else { return Err(refuse()) };
    // The WITH queries may only feed the SELECT: RETURNING and ON CONFLICT of the INSERT run
    // on the coordinator, where the WITH queries do not exist any more.
    if !(*parse).onConflict.is_null() || contains_cte_reference((*parse).returningList.cast()) {
        return Err(refuse());
    }
    // The SELECT as a statement of its own, owning the WITH queries: its references to the
    // INSERT's level (the WITH queries) move one level closer first; the WITH queries keep
    // theirs (their parent level is the SELECT now).
    let select: *mut pg_sys::Query = pg_sys::copyObjectImpl((*rtes[*source]).subquery.cast()).cast();
    increment_var_sublevels_up(select.cast(), -1, 1);
    // Literals of the SELECT are still of type unknown (the INSERT coerces them to the column
    // types): they come back as text, which the INSERT's coercions read the same way.
    let mut literals = Vec::new();
    for entry in list_pointers::<pg_sys::TargetEntry>((*select).targetList) {
        let expr = (*entry).expr.cast::<pg_sys::Node>();
        if pg_sys::exprType(expr) != pg_sys::UNKNOWNOID {
            continue;
        }
        if (*expr).type_ != pg_sys::NodeTag::T_Const {
            return Err(refuse());
        }
        let constant = expr.cast::<pg_sys::Const>();
        let value = if (*constant).constisnull {
            pg_sys::Datum::from(0usize)
        } else {
            pg_sys::Datum::from(pg_sys::cstring_to_text((*constant).constvalue.cast_mut_ptr()))
        };
        (*entry).expr = pg_sys::makeConst(pg_sys::TEXTOID, -1, pg_sys::DEFAULT_COLLATION_OID, -1, value, (*constant).constisnull, false).cast();
        literals.push((*entry).resno);
    }
    (*select).cteList = pg_sys::copyObjectImpl((*parse).cteList.cast()).cast();
    (*select).hasModifyingCTE = true;
    (*select).hasRecursive = (*parse).hasRecursive;
    let Some(planned) = plan_statement(select, query_string, cursor_options, bound_params)? else { return Err(refuse()) };
    let scan = (*planned).planTree;
    if !crate::executor::remote_scan::is_shard_scan(scan) {
        return Err(refuse());
    }
    let (mut plan, exprs) = crate::executor::remote_scan::plan_and_exprs(scan.cast())?;
    if !plan.writes {
        return Err(refuse());
    }
    // The pruning values travel in the plan text of the results entry.
    plan.prune_nodes = exprs
        .iter()
        .map(|&e| std::ffi::CStr::from_ptr(pg_sys::nodeToString(e.cast())).to_string_lossy().into_owned())
        .collect();
    let columns: Vec<(String, *mut pg_sys::Node)> = list_pointers::<pg_sys::TargetEntry>((*select).targetList)
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("c{}", i + 1), (**e).expr.cast::<pg_sys::Node>()))
        .collect();
    let results = super::aggregates::results_rte(&plan, &columns)?;

    let insert: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    (*insert).cteList = std::ptr::null_mut();
    (*insert).hasModifyingCTE = false;
    (*insert).hasRecursive = false;
    let rtable = (*insert).rtable;
    (*(*rtable).elements.add(*source)).ptr_value = results.cast();
    retype_literal_columns(insert, (*source + 1) as i32, &literals);
    let planned = pg_sys::standard_planner(insert, query_string, cursor_options, bound_params);
    append_relations(planned, parse);
    Ok(planned)
}

/// PostgreSQL's `IncrementVarSublevelsUp` (rewriteManip.c; not in pgrx's bindings): shifts the
/// level of every Var, Aggref, PlaceHolderVar and CTE reference pointing at least
/// `min_sublevels_up` levels up by `delta`.
unsafe fn increment_var_sublevels_up(node: *mut pg_sys::Node, delta: i32, min_sublevels_up: i32) {
    extern "C-unwind" {
        fn IncrementVarSublevelsUp(node: *mut pg_sys::Node, delta_sublevels_up: i32, min_sublevels_up: i32);
    }
    // SAFETY: a plain call on a valid node tree; an ERROR raised inside becomes a Rust panic
    // at this boundary instead of a longjmp across Rust frames.
    pg_sys::ffi::pg_guard_ffi_boundary(|| IncrementVarSublevelsUp(node, delta, min_sublevels_up));
}

/// The INSERT's references to the source columns that were literals of type unknown now read
/// text (the same characters).
unsafe fn retype_literal_columns(insert: *mut pg_sys::Query, source: i32, columns: &[i16]) {
    struct Context<'a> {
        source: i32,
        columns: &'a [i16],
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let wanted = &*(context as *const Context);
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let var = node.cast::<pg_sys::Var>();
            if (*var).varlevelsup == 0
                && (*var).varno == wanted.source
                && wanted.columns.contains(&(*var).varattno)
                && (*var).vartype == pg_sys::UNKNOWNOID
            {
                (*var).vartype = pg_sys::TEXTOID;
                (*var).varcollid = pg_sys::DEFAULT_COLLATION_OID;
            }
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    if columns.is_empty() {
        return;
    }
    let mut context = Context { source, columns };
    walker((*insert).targetList.cast(), (&mut context as *mut Context).cast());
}

/// Whether an expression tree refers to a WITH query (a sublink reading it).
unsafe fn contains_cte_reference(node: *mut pg_sys::Node) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            let query = node.cast::<pg_sys::Query>();
            if list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).iter().any(|&rte| (*rte).rtekind == pg_sys::RTEKind::RTE_CTE) {
                return true;
            }
            return pg_sys::query_tree_walker(query, Some(walker), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    walker(node, std::ptr::null_mut())
}

/// UPDATE or DELETE of a reference table: PostgreSQL's plan for the coordinator's copy, under
/// a ShardScan that then changes every worker's copy (in the distributed transaction), with
/// the same statement or, when the workers could not run it the same way, by the rows the
/// coordinator changed (reference_rows.rs); every copy must change as many rows.
unsafe fn reference_write(
    parse: *mut pg_sys::Query,
    analysis: &Analysis,
    table: &DistributedTable,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<*mut pg_sys::PlannedStmt> {
    if analysis.row_security {
        return Err(unsupported("UPDATE and DELETE of reference tables under row-level security are not supported yet"));
    }
    if !(*parse).withCheckOptions.is_null() {
        return Err(unsupported("UPDATE of a reference table through a view WITH CHECK OPTION is not supported yet")
            .hint("Update the table itself, with the view's conditions in WHERE."));
    }
    if (*parse).hasModifyingCTE {
        return Err(unsupported("data-modifying WITH queries on reference tables are not supported yet"));
    }
    let mut user_params = Vec::new();
    collect_params(parse.cast(), &mut user_params);
    let (shipped, hoisted) = super::hoist::hoist(parse, user_params.iter().copied().max().unwrap_or(0) + 1);
    // What only the coordinator has, or what each copy would compute its own way: the
    // coordinator changes its copy, the workers' copies follow row by row.
    if !analysis.tables.is_empty()
        || analysis.local
        || !shippable::shippable(shipped.cast(), shippable::Rules { whole_statement: true, row_identity: false })
    {
        let write = super::reference_rows::plan(parse, table)?;
        let deparsed = deparse_query(write.remote)?;
        let mut plan = ShardScanPlan::from_deparsed(&deparsed, table.relid);
        plan.max_param = write.columns as i32;
        plan.replicated_columns = write.columns;
        return reference_plan(plan, Vec::new(), write.local, write.columns, (*parse).returningList.is_null(), query_string, cursor_options, bound_params);
    }
    // Only the rows count: RETURNING is the coordinator's.
    (*shipped).returningList = std::ptr::null_mut();
    let deparsed = deparse_query(shipped)?;
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, table.relid);
    let mut params_used = Vec::new();
    collect_params(shipped.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    let mut exprs = Vec::new();
    for (id, expr) in hoisted {
        plan.hoisted.push((id, exprs.len()));
        exprs.push(expr);
    }
    reference_plan(plan, exprs, parse, 0, false, query_string, cursor_options, bound_params)
}

/// The plan of a reference-table write: PostgreSQL's plan of `local` on the coordinator's
/// copy, under a ShardScan whose tasks then change every worker's copy. The first `hidden`
/// columns the local plan returns are for the tasks (reference_rows.rs), the others the
/// statement's RETURNING.
#[allow(clippy::too_many_arguments)]
unsafe fn reference_plan(
    mut plan: ShardScanPlan,
    exprs: Vec<*mut pg_sys::Node>,
    local: *mut pg_sys::Query,
    hidden: usize,
    no_returning: bool,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> Result<*mut pg_sys::PlannedStmt> {
    plan.modify = true;
    plan.reference_write = true;
    let planned = pg_sys::standard_planner(local, query_string, cursor_options, bound_params);
    if no_returning {
        (*planned).hasReturning = false;
    }
    let local = (*planned).planTree;
    let mut scan_tlist: *mut pg_sys::List = std::ptr::null_mut();
    let mut tlist: *mut pg_sys::List = std::ptr::null_mut();
    for (i, entry) in list_pointers::<pg_sys::TargetEntry>((*local).targetlist).into_iter().enumerate() {
        let expr = (*entry).expr.cast::<pg_sys::Node>();
        let var = pg_sys::makeVar(pg_sys::INDEX_VAR, (*entry).resno, pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr), 0);
        scan_tlist = pg_sys::lappend(scan_tlist, pg_sys::makeTargetEntry(var.cast(), (*entry).resno, (*entry).resname, false).cast());
        if i >= hidden {
            let out = pg_sys::copyObjectImpl(var.cast());
            tlist = pg_sys::lappend(tlist, pg_sys::makeTargetEntry(out.cast(), (i - hidden + 1) as i16, (*entry).resname, false).cast());
        }
    }
    let scan = make_scan(&plan, exprs, 0, tlist, scan_tlist, std::ptr::null_mut())?;
    (*scan).custom_plans = pg_sys::lappend(std::ptr::null_mut(), local.cast());
    (*scan).scan.plan.startup_cost = (*local).startup_cost;
    (*scan).scan.plan.total_cost = (*local).total_cost + 100.0;
    (*scan).scan.plan.plan_rows = (*local).plan_rows;
    (*scan).scan.plan.plan_width = (*local).plan_width;
    (*planned).planTree = scan.cast();
    Ok(planned)
}

/// The PlannedStmt around a ShardScan whose tasks return `outputs`; the scan returns them, or
/// evaluates `projection` over them when there is one.
pub(super) unsafe fn planned_statement(
    parse: *mut pg_sys::Query,
    plan: &ShardScanPlan,
    exprs: Vec<*mut pg_sys::Node>,
    outputs: &[*mut pg_sys::TargetEntry],
    projection: *mut pg_sys::List,
) -> Result<*mut pg_sys::PlannedStmt> {
    // Range table: every relation of the statement, so permissions are checked and cached
    // plans are locked and invalidated as for PostgreSQL's own plans; then one entry naming
    // the scan's output columns.
    let mut rtable: *mut pg_sys::List = std::ptr::null_mut();
    let mut relation_oids: *mut pg_sys::List = std::ptr::null_mut();
    crate::deparse::query::for_each_rte(parse, &mut |rte| {
        if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION {
            let copy: *mut pg_sys::RangeTblEntry = pg_sys::copyObjectImpl(rte.cast()).cast();
            rtable = pg_sys::lappend(rtable, copy.cast());
            relation_oids = pg_sys::lappend_oid(relation_oids, (*rte).relid);
        }
    });
    let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
    for &entry in outputs {
        let name = if (*entry).resname.is_null() { c"?column?".as_ptr() } else { (*entry).resname.cast_const() };
        colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(name)).cast());
    }
    let dummy: *mut pg_sys::RangeTblEntry = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
    (*dummy).type_ = pg_sys::NodeTag::T_RangeTblEntry;
    (*dummy).rtekind = pg_sys::RTEKind::RTE_FUNCTION;
    (*dummy).eref = pg_sys::makeAlias(c"shard_scan".as_ptr(), colnames);
    (*dummy).inFromCl = true;
    rtable = pg_sys::lappend(rtable, dummy.cast());
    let dummy_index = (*rtable).length;

    let mut scan_tlist: *mut pg_sys::List = std::ptr::null_mut();
    let mut tlist: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &entry) in outputs.iter().enumerate() {
        let expr = (*entry).expr.cast::<pg_sys::Node>();
        let (typ, typmod, collation) = (pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr));
        let resno = (i + 1) as i16;
        let name = if (*entry).resname.is_null() { std::ptr::null_mut() } else { pg_sys::pstrdup((*entry).resname) };
        let scan_var = pg_sys::makeVar(dummy_index, resno, typ, typmod, collation, 0);
        scan_tlist = pg_sys::lappend(scan_tlist, pg_sys::makeTargetEntry(scan_var.cast(), resno, name, false).cast());
        let out_var = pg_sys::makeVar(pg_sys::INDEX_VAR, resno, typ, typmod, collation, 0);
        tlist = pg_sys::lappend(tlist, pg_sys::makeTargetEntry(out_var.cast(), resno, name, false).cast());
    }
    if !projection.is_null() {
        tlist = projection;
    }
    let scan = make_scan(plan, exprs, 0, tlist, scan_tlist, std::ptr::null_mut())?;
    (*scan).scan.plan.startup_cost = 100.0;
    (*scan).scan.plan.total_cost = 100.0;
    (*scan).scan.plan.plan_rows = 1.0;
    (*scan).scan.plan.plan_width = 32;

    let stmt: *mut pg_sys::PlannedStmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>()).cast();
    (*stmt).type_ = pg_sys::NodeTag::T_PlannedStmt;
    (*stmt).commandType = (*parse).commandType;
    (*stmt).queryId = (*parse).queryId;
    (*stmt).hasReturning = !(*parse).returningList.is_null();
    (*stmt).canSetTag = (*parse).canSetTag;
    (*stmt).planTree = scan.cast();
    (*stmt).rtable = rtable;
    (*stmt).relationOids = relation_oids;
    (*stmt).stmt_location = (*parse).stmt_location;
    (*stmt).stmt_len = (*parse).stmt_len;
    Ok(stmt)
}

/// Whether the statement's own clauses read a system column other than tableoid (ctid, xmin, ...).
unsafe fn reads_system_columns(parse: *mut pg_sys::Query) -> bool {
    #[pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        // Subqueries read their own range tables.
        if node.is_null() || (*node).type_ == pg_sys::NodeTag::T_Query {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let attno = (*node.cast::<pg_sys::Var>()).varattno as i32;
            return attno < 0 && attno != pg_sys::TableOidAttributeNumber;
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    [(*parse).returningList.cast(), (*parse).targetList.cast(), (*parse).jointree.cast::<pg_sys::Node>()]
        .into_iter()
        .any(|node| walker(node, std::ptr::null_mut()))
}
