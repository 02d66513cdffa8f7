//! MERGE for workers. PostgreSQL 15's deparser prints every statement but MERGE, so the frame
//! of a MERGE (its clauses and keywords) is printed here, and everything in it by ruleutils:
//! each expression by `deparse_expression` in a context of the statement's range table (as
//! EXPLAIN prints a plan's expressions), the source subquery by `pg_get_querydef`.
//!
//! The target (and a source that is a distributed table) is printed `schema.relation pgs_r<N>`
//! with an empty search_path, so the template lexer finds it as for every other statement
//! (query.rs). The planner (planner/merge.rs) passes only what this module can print: a source
//! of one range table entry, no subqueries in the conditions or actions.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use sharding_core::sql_template::{self, ALIAS_PREFIX};

use crate::commands::utility::list_pointers;
use crate::deparse::query::{relation_name, DeparsedQuery, SlotNames, TransmissionSettings};
use crate::deparse::quote;
use crate::error::{Result, ShardingError};

/// The alias the source gets when it is a subquery.
pub const SOURCE_ALIAS: &str = "pgs_source";

/// Prints a MERGE whose target is range table entry `resultRelation` and whose source is the
/// one entry of its FROM list: a subquery (printed whole, named `pgs_source`), or a relation
/// that `slot_source` says is distributed (printed as a template slot).
pub unsafe fn deparse_merge(query: *mut pg_sys::Query, slot_source: bool) -> Result<DeparsedQuery> {
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(query.cast()).cast();
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*copy).rtable);
    let target = rtes
        .get(((*copy).resultRelation as usize).wrapping_sub(1))
        .copied()
        .ok_or_else(|| ShardingError::internal("a MERGE without its target"))?;
    let source_rti = source_index(copy).ok_or_else(|| ShardingError::internal("a MERGE source of more than one range table entry"))?;
    let source = rtes.get(source_rti.wrapping_sub(1)).copied().ok_or_else(|| ShardingError::internal("a MERGE source outside the range table"))?;

    let mut relations = vec![(*target).relid];
    (*target).alias = pg_sys::makeAlias(alias(1)?.as_ptr(), std::ptr::null_mut());
    let source_text = match (*source).rtekind {
        pg_sys::RTEKind::RTE_RELATION if slot_source => {
            if !relations.contains(&(*source).relid) {
                relations.push((*source).relid);
            }
            (*source).alias = pg_sys::makeAlias(alias(2)?.as_ptr(), std::ptr::null_mut());
            None
        }
        pg_sys::RTEKind::RTE_SUBQUERY => {
            let name = CString::new(SOURCE_ALIAS).map_err(|e| ShardingError::internal(e.to_string()))?;
            (*source).alias = pg_sys::makeAlias(name.as_ptr(), (*(*source).eref).colnames);
            Some(String::new())
        }
        _ => return Err(ShardingError::internal("a MERGE source that is neither a distributed table nor a subquery")),
    };

    let sql = {
        let _settings = TransmissionSettings::enter();
        let printer = Printer::new(copy);
        let qualified = |relid: pg_sys::Oid, n: usize| -> Result<String> {
            let (schema, name) = relation_name(relid)?;
            Ok(format!("{} {ALIAS_PREFIX}{n}", quote::qualified(&schema, &name)))
        };
        let mut sql = format!("MERGE INTO {} USING ", qualified((*target).relid, 1)?);
        match source_text {
            None => sql.push_str(&qualified((*source).relid, 2)?),
            Some(_) => {
                let text = CStr::from_ptr(pg_sys::pg_get_querydef((*source).subquery, false)).to_string_lossy().into_owned();
                let columns: Vec<String> = list_pointers::<pg_sys::String>((*(*source).eref).colnames)
                    .iter()
                    .map(|&name| quote::ident(&CStr::from_ptr((*name).sval).to_string_lossy()))
                    .collect();
                sql.push_str(&format!("({text}) {SOURCE_ALIAS}({})", columns.join(", ")));
            }
        }
        sql.push_str(" ON ");
        sql.push_str(&printer.expression((*(*copy).jointree).quals));
        for action in list_pointers::<pg_sys::MergeAction>((*copy).mergeActionList) {
            sql.push_str(if (*action).matched { " WHEN MATCHED" } else { " WHEN NOT MATCHED" });
            if !(*action).qual.is_null() {
                sql.push_str(" AND ");
                sql.push_str(&printer.expression((*action).qual));
            }
            sql.push_str(" THEN ");
            let entries = list_pointers::<pg_sys::TargetEntry>((*action).targetList);
            let entries: Vec<_> = entries.into_iter().filter(|e| !(**e).resjunk).collect();
            match (*action).commandType {
                pg_sys::CmdType::CMD_UPDATE => {
                    let sets: Vec<String> = entries
                        .iter()
                        .map(|&e| Ok(format!("{} = {}", column_name((*target).relid, (*e).resno)?, printer.expression((*e).expr.cast()))))
                        .collect::<Result<_>>()?;
                    sql.push_str("UPDATE SET ");
                    sql.push_str(&sets.join(", "));
                }
                pg_sys::CmdType::CMD_INSERT if entries.is_empty() => sql.push_str("INSERT DEFAULT VALUES"),
                pg_sys::CmdType::CMD_INSERT => {
                    let columns: Vec<String> = entries.iter().map(|&e| column_name((*target).relid, (*e).resno)).collect::<Result<_>>()?;
                    let values: Vec<String> = entries.iter().map(|&e| printer.expression((*e).expr.cast())).collect();
                    sql.push_str(&format!("INSERT ({})", columns.join(", ")));
                    match (*action).override_ {
                        pg_sys::OverridingKind::OVERRIDING_USER_VALUE => sql.push_str(" OVERRIDING USER VALUE"),
                        pg_sys::OverridingKind::OVERRIDING_SYSTEM_VALUE => sql.push_str(" OVERRIDING SYSTEM VALUE"),
                        _ => {}
                    }
                    sql.push_str(&format!(" VALUES ({})", values.join(", ")));
                }
                pg_sys::CmdType::CMD_DELETE => sql.push_str("DELETE"),
                pg_sys::CmdType::CMD_NOTHING => sql.push_str("DO NOTHING"),
                other => return Err(ShardingError::internal(format!("a MERGE action of command type {other}"))),
            }
        }
        sql
    };

    let names = SlotNames::new(relations)?;
    let template = sql_template::parse(&sql, |s, r| names.lookup(s, r))
        .map_err(|e| ShardingError::internal(format!("cannot read back deparsed SQL: {}", e.0)))?;
    let expected = if slot_source { 2 } else { 1 };
    let slots = template.relations().count();
    if slots != expected {
        return Err(ShardingError::internal(format!("a MERGE printed with {slots} relations, expected {expected}: {sql}")));
    }
    // A MERGE writes as the current role (its target is never a view in PostgreSQL 15).
    Ok(DeparsedQuery { template, relations: names.relations, run_as: 0 })
}

/// The range table index of the one entry of a MERGE's FROM list (its source).
pub unsafe fn source_index(query: *mut pg_sys::Query) -> Option<usize> {
    let items = list_pointers::<pg_sys::Node>((*(*query).jointree).fromlist);
    match items[..] {
        [item] if (*item).type_ == pg_sys::NodeTag::T_RangeTblRef => Some((*item.cast::<pg_sys::RangeTblRef>()).rtindex as usize),
        _ => None,
    }
}

fn alias(n: usize) -> Result<CString> {
    CString::new(format!("{ALIAS_PREFIX}{n}")).map_err(|e| ShardingError::internal(e.to_string()))
}

unsafe fn column_name(relid: pg_sys::Oid, attno: i16) -> Result<String> {
    let name = pg_sys::get_attname(relid, attno, true);
    if name.is_null() {
        return Err(ShardingError::internal(format!("column {attno} of relation {} disappeared", relid.to_u32())));
    }
    Ok(quote::ident(&CStr::from_ptr(name).to_string_lossy()))
}

/// Prints expressions of one statement, its range table entries named by their aliases.
struct Printer {
    context: *mut pg_sys::List,
}

impl Printer {
    unsafe fn new(query: *mut pg_sys::Query) -> Self {
        let count = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).len();
        let mut every: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        for rti in 1..=count {
            every = pg_sys::bms_add_member(every, rti as i32);
        }
        let names = pg_sys::select_rtable_names_for_explain((*query).rtable, every);
        let statement: *mut pg_sys::PlannedStmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>()).cast();
        (*statement).type_ = pg_sys::NodeTag::T_PlannedStmt;
        (*statement).rtable = (*query).rtable;
        Self { context: pg_sys::deparse_context_for_plan_tree(statement, names) }
    }

    unsafe fn expression(&self, node: *mut pg_sys::Node) -> String {
        if node.is_null() {
            return "true".to_string();
        }
        CStr::from_ptr(pg_sys::deparse_expression(node, self.context, true, false)).to_string_lossy().into_owned()
    }
}
