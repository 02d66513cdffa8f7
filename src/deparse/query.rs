//! SQL for tasks, printed from parse trees by PostgreSQL's own deparser (ruleutils), never by
//! editing a user's text.
//!
//! Relations are renamed to shards through a template (sharding_core::sql_template): before
//! deparsing, every distributed or reference relation in the tree gets a forced alias
//! `pgs_r<N>`, and printing runs with an empty search_path so that each one comes out as
//! `schema.relation pgs_r<N>`; the lexer turns exactly those token runs into slots.
//! Printing also runs with the settings postgres_fdw uses for the same reason (ISO dates,
//! postgres intervals, exact floats), so constants read back on a worker to the same values.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::sql_template::{self, Template, ALIAS_PREFIX};

use crate::catalog::cache;
use crate::deparse::quote;
use crate::error::{Result, ShardingError};

/// Settings in force while printing SQL for workers (and parameter values), undone on drop.
pub struct TransmissionSettings {
    nest_level: i32,
}

impl TransmissionSettings {
    pub fn enter() -> Self {
        // SAFETY: a GUC nest level undone by AtEOXact_GUC in drop, or by the transaction's
        // abort when an ERROR passes through.
        unsafe {
            let nest_level = pg_sys::NewGUCNestLevel();
            for (name, value) in [
                (c"search_path", c""),
                (c"DateStyle", c"ISO"),
                (c"IntervalStyle", c"postgres"),
                (c"extra_float_digits", c"3"),
            ] {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
            Self { nest_level }
        }
    }
}

impl Drop for TransmissionSettings {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: the level made in enter(), still the innermost.
            unsafe { pg_sys::AtEOXact_GUC(true, self.nest_level) };
        }
    }
}

/// The lossless text form of values that travel between nodes as text (rows sent to shards,
/// broadcast rows), whatever the session's output settings: ISO dates and times (a time zone
/// as a numeric offset, never an abbreviation another node may read differently), floats with
/// the shortest exact digits, intervals in the postgres style. Every node reads these forms
/// under any DateStyle and IntervalStyle. Set on the variables the output functions read
/// (cheap enough per row, unlike a GUC change), and restored on drop, also when an ERROR
/// unwinds.
pub struct ValueOutput {
    date_style: std::ffi::c_int,
    float_digits: std::ffi::c_int,
    interval_style: std::ffi::c_int,
}

impl ValueOutput {
    pub fn enter() -> Self {
        // SAFETY: backend-local variables of the output functions, restored in drop.
        unsafe {
            let saved = ValueOutput {
                date_style: pg_sys::DateStyle,
                float_digits: pg_sys::extra_float_digits,
                interval_style: pg_sys::IntervalStyle,
            };
            pg_sys::DateStyle = pg_sys::USE_ISO_DATES as std::ffi::c_int;
            pg_sys::extra_float_digits = saved.float_digits.max(1);
            pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as std::ffi::c_int;
            saved
        }
    }
}

impl Drop for ValueOutput {
    fn drop(&mut self) {
        // SAFETY: puts back what enter() saved.
        unsafe {
            pg_sys::DateStyle = self.date_style;
            pg_sys::extra_float_digits = self.float_digits;
            pg_sys::IntervalStyle = self.interval_style;
        }
    }
}

/// Calls `visit` for every range table entry of `query` and of every query nested in it
/// (subqueries in FROM, CTEs, sublinks anywhere in expressions).
pub unsafe fn for_each_rte(query: *mut pg_sys::Query, visit: &mut dyn FnMut(*mut pg_sys::RangeTblEntry)) {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let visit = &mut *(context as *mut &mut dyn FnMut(*mut pg_sys::RangeTblEntry));
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(
                node.cast(),
                Some(walker),
                context,
                pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
            ),
            pg_sys::NodeTag::T_RangeTblEntry => {
                visit(node.cast());
                false
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    let mut visit = visit;
    let context = &mut visit as *mut &mut dyn FnMut(*mut pg_sys::RangeTblEntry) as *mut std::ffi::c_void;
    walker(query.cast(), context);
}

/// The relations a template's slots stand for, and how the lexer recognises them.
pub(crate) struct SlotNames {
    pub(crate) relations: Vec<pg_sys::Oid>,
    names: Vec<(String, String)>,
}

impl SlotNames {
    pub(crate) fn new(relations: Vec<pg_sys::Oid>) -> Result<Self> {
        let names = relations.iter().map(|&relid| relation_name(relid)).collect::<Result<_>>()?;
        Ok(Self { relations, names })
    }

    pub(crate) fn lookup(&self, schema: &str, relation: &str) -> Option<usize> {
        self.names.iter().position(|(s, r)| s == schema && r == relation)
    }
}

pub(crate) fn relation_name(relid: pg_sys::Oid) -> Result<(String, String)> {
    // SAFETY: syscache lookups; NULL results are checked.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if name.is_null() || schema.is_null() {
            return Err(ShardingError::internal(format!("relation {} disappeared", relid.to_u32())));
        }
        Ok((CStr::from_ptr(schema).to_string_lossy().into_owned(), CStr::from_ptr(name).to_string_lossy().into_owned()))
    }
}

/// A statement deparsed for workers: the template and the relations of its slots.
#[derive(Debug, Clone)]
pub struct DeparsedQuery {
    pub template: Template,
    pub relations: Vec<pg_sys::Oid>,
    /// The role whose rights every distributed table of the statement is read with, when that
    /// is not the current role (the tables are those of a view of that role's); else 0.
    pub run_as: u32,
}

/// The role of `checkAsUser` values (0: the current role): one role for all, or 0.
pub fn common_role(roles: &[pg_sys::Oid]) -> u32 {
    match roles.first() {
        Some(first) if roles.iter().all(|r| r == first) => first.to_u32(),
        _ => 0,
    }
}

/// The target of an UPDATE or DELETE through a view (here or in a WITH query): the rewriter
/// made it from the view's FROM entry, which ruleutils would print in the FROM (USING) list too.
unsafe fn targets_out_of_from(query: *mut pg_sys::Query) {
    let result = (*query).resultRelation;
    if result > 0 && matches!((*query).commandType, pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE) {
        if let Some(&target) = crate::commands::utility::list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).get(result as usize - 1) {
            (*target).inFromCl = false;
        }
    }
    for cte in crate::commands::utility::list_pointers::<pg_sys::CommonTableExpr>((*query).cteList) {
        let inner = (*cte).ctequery.cast::<pg_sys::Query>();
        if !inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query {
            targets_out_of_from(inner);
        }
    }
}

/// Prints `query` (left unchanged: a copy gets the aliases) for workers.
pub unsafe fn deparse_query(query: *mut pg_sys::Query) -> Result<DeparsedQuery> {
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(query.cast()).cast();
    targets_out_of_from(copy);
    let mut relations: Vec<pg_sys::Oid> = Vec::new();
    let mut roles: Vec<pg_sys::Oid> = Vec::new();
    let mut forced = 0usize;
    let mut failure: Option<ShardingError> = None;
    for_each_rte(copy, &mut |rte| {
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || failure.is_some() {
            return;
        }
        match cache::table((*rte).relid) {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(error) => {
                failure = Some(error);
                return;
            }
        }
        forced += 1;
        roles.push((*rte).checkAsUser);
        let alias = CString::new(format!("{ALIAS_PREFIX}{forced}")).unwrap_or_default();
        let colnames = if (*rte).alias.is_null() { std::ptr::null_mut() } else { (*(*rte).alias).colnames };
        (*rte).alias = pg_sys::makeAlias(alias.as_ptr(), colnames);
        if !relations.contains(&(*rte).relid) {
            relations.push((*rte).relid);
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    let sql = {
        let _settings = TransmissionSettings::enter();
        CStr::from_ptr(pg_sys::pg_get_querydef(copy, false)).to_string_lossy().into_owned()
    };
    let names = SlotNames::new(relations)?;
    let template = sql_template::parse(&sql, |s, r| names.lookup(s, r))
        .map_err(|e| ShardingError::internal(format!("cannot read back deparsed SQL: {}", e.0)))?;
    let slots = template.relations().count();
    if slots != forced {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "could not name every distributed table of this query for the workers",
        )
        .detail(format!("{forced} references, {slots} found in: {sql}")));
    }
    Ok(DeparsedQuery { template, relations: names.relations, run_as: common_role(&roles) })
}

/// What a scan's task returns in one column.
pub enum ScanColumn {
    /// The table's column of that name.
    Column(String),
    /// The whole row, as an anonymous row of these columns (the shard's own row type means
    /// nothing on the coordinator; the coordinator reads the row as the table's row type).
    Row(Vec<String>),
    /// A constant oid (the coordinator's own `tableoid`).
    Oid(u32),
}

/// `SELECT columns FROM relation WHERE quals` for a scan of one distributed table: `quals`
/// must refer to the table as range table entry 1.
pub unsafe fn deparse_scan(relid: pg_sys::Oid, columns: &[ScanColumn], quals: &[*mut pg_sys::Node]) -> Result<DeparsedQuery> {
    let alias = format!("{ALIAS_PREFIX}1");
    let (schema, name) = relation_name(relid)?;
    let mut sql = String::from("SELECT ");
    if columns.is_empty() {
        sql.push_str("NULL");
    }
    let qualified = |column: &String| format!("{alias}.{}", quote::ident(column));
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        match column {
            ScanColumn::Column(name) => sql.push_str(&qualified(name)),
            ScanColumn::Row(names) => {
                sql.push_str("ROW(");
                sql.push_str(&names.iter().map(qualified).collect::<Vec<_>>().join(", "));
                sql.push(')');
            }
            ScanColumn::Oid(oid) => sql.push_str(&format!("{oid}::pg_catalog.oid")),
        }
    }
    sql.push_str(&format!(" FROM {} {alias}", quote::qualified(&schema, &name)));
    if !quals.is_empty() {
        let _settings = TransmissionSettings::enter();
        let alias_c = CString::new(alias.clone()).unwrap_or_default();
        let context = pg_sys::deparse_context_for(alias_c.as_ptr(), relid);
        for (i, qual) in quals.iter().enumerate() {
            let text = CStr::from_ptr(pg_sys::deparse_expression(*qual, context, true, false)).to_string_lossy().into_owned();
            sql.push_str(if i == 0 { " WHERE (" } else { " AND (" });
            sql.push_str(&text);
            sql.push(')');
        }
    }
    let names = SlotNames::new(vec![relid])?;
    let template = sql_template::parse(&sql, |s, r| names.lookup(s, r))
        .map_err(|e| ShardingError::internal(format!("cannot read back deparsed SQL: {}", e.0)))?;
    if template.relations().count() != 1 {
        return Err(ShardingError::internal(format!("scan of one relation printed as: {sql}")));
    }
    Ok(DeparsedQuery { template, relations: names.relations, run_as: 0 })
}
