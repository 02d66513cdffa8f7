//! The distributed part of a plan: a CustomScan ("ShardScan") that runs one task per shard
//! (or shard group) on the workers and returns their rows.
//!
//! Two shapes share it: a scan of one distributed table (its rows, filtered and projected on
//! the shards, for PostgreSQL's executor to join, aggregate and sort on the coordinator), and a
//! whole statement sent to the shards (router queries, UPDATE and DELETE). The plan's facts are
//! serialized into `custom_private`, so plans survive copying and caching; shards are pruned at
//! execution, with the statement's parameter values.

use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};
use sharding_core::array_literal::ArrayLiteral;
use sharding_core::sql_template::{Piece, Template};

use crate::catalog::{cache, tables::DistributedTable};
use crate::connection::TaskParam;
use crate::deparse::query::{DeparsedQuery, TransmissionSettings};
use crate::error::{OrRaise, Result, ShardingError};
use crate::executor::tasks::{self, Task};
use crate::transaction::remote;

/// What a ShardScan does, as planned.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ShardScanPlan {
    /// The task SQL: text pieces and relation slots (index into `relations`).
    pub pieces: Vec<(Option<usize>, String)>,
    pub relations: Vec<u32>,
    /// The distributed table whose shards define the tasks (co-located tables follow it).
    pub anchor: u32,
    /// Shard pruning: a conjunction of disjunctions of values (indexes into `custom_exprs`;
    /// true when the value is an array, as in `= ANY(...)`). Empty: every shard.
    pub prune: Vec<Vec<(usize, bool)>>,
    /// Parameters the task SQL refers to ($n); all of $1..$max are sent.
    pub params_used: Vec<i32>,
    pub max_param: i32,
    /// Whether result values come back in binary (every column of a built-in type).
    pub binary: bool,
    /// UPDATE or DELETE: the affected counts are the statement's.
    pub modify: bool,
    /// A SELECT with a data-modifying WITH query: it writes (in the distributed transaction),
    /// but its count is of the rows it returns.
    #[serde(default)]
    pub writes: bool,
    /// A whole SELECT: even when pruning leaves no shard (a NULL key), one shard must answer,
    /// since `count(*)` of nothing is still a row.
    pub at_least_one: bool,
    /// UPDATE/DELETE of a reference table: the child plan (`custom_plans`) changes the
    /// coordinator's copy, then the tasks every worker's copy, and their counts must agree.
    pub reference_write: bool,
    /// The tasks change the rows the child plan changed (planner/reference_rows.rs): its
    /// first this many columns, the key and the new values of each row, become the tasks'
    /// array parameters `$1...`.
    #[serde(default)]
    pub replicated_columns: usize,
    /// Parameters the coordinator computes when the statement runs: (parameter id, index into
    /// `custom_exprs`) (see planner/hoist.rs).
    pub hoisted: Vec<(i32, usize)>,
    /// The statement locks rows (FOR UPDATE/SHARE): the locks must live as long as the
    /// coordinator's transaction.
    #[serde(default)]
    pub locks_rows: bool,
    /// Pruning values carried in the plan itself (nodeToString), for scans whose plan node is
    /// built from a serialized plan (split queries): they become the `custom_exprs`.
    pub prune_nodes: Vec<String>,
    /// Tables joined without being co-located, read before the tasks run and sent to every
    /// task as parameters (planner/broadcast.rs).
    #[serde(default)]
    pub broadcasts: Vec<Broadcast>,
    /// A statement of its own (a data-modifying WITH query, planner/modifying_ctes.rs; its
    /// Query tree, nodeToString) that runs when the scan starts and whose RETURNING rows the
    /// scan returns; it has no tasks.
    #[serde(default)]
    pub statement: Option<String>,
    /// Its SQL, for EXPLAIN.
    #[serde(default)]
    pub statement_sql: String,
    /// The role the tasks run as on the nodes, when the tables are read with another role's
    /// rights (a view's owner's); 0: the current role.
    #[serde(default)]
    pub run_as: u32,
}

/// One table broadcast to the tasks: its rows, read by `plan` (one column per referenced
/// column of the table), become one text array parameter per column, `$first_param` on.
///
/// Or an intermediate result (planner/intermediate.rs): the rows of a subquery, `query`, which
/// the coordinator runs first with PostgreSQL's executor (and the distributed planner).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Broadcast {
    /// The table, for EXPLAIN; for an intermediate result, the subquery's SQL.
    pub table: String,
    pub plan: ShardScanPlan,
    pub first_param: i32,
    pub columns: usize,
    /// An intermediate result: the subquery (its Query tree, nodeToString).
    #[serde(default)]
    pub query: Option<String>,
    /// Only whether the subquery returns a row matters (EXISTS): its first row is sent, as a
    /// single marker column.
    #[serde(default)]
    pub exists: bool,
    /// At most this many rows are needed (0: all). A scalar subquery needs two, for the
    /// worker to fail as PostgreSQL does when there is more than one.
    #[serde(default)]
    pub row_limit: u64,
    /// The rows an UPDATE or DELETE changes, chosen here (planner/chosen_rows.rs): the
    /// subquery's scan of this range table entry (the target) reads their ctid and xmin, its
    /// first three columns identify each row (ctid, distribution value, xmin), and each task
    /// gets only its shard's rows; 0 for anything else.
    #[serde(default)]
    pub target_rows: u32,
    /// A broadcast table routed by a join key (planner/broadcast.rs, `routing_column`): each
    /// row goes only to the task of the shard its value of this column (of type `route_type`)
    /// hashes to, and a row whose value is NULL to none.
    #[serde(default)]
    pub route_column: Option<usize>,
    #[serde(default)]
    pub route_type: u32,
    /// A row whose routing value is NULL fails (an INSERT of NULL into the distribution
    /// column) instead of going nowhere when its column after the sent ones is true: MERGE
    /// ... WHEN NOT MATCHED THEN INSERT (planner/merge.rs).
    #[serde(default)]
    pub null_key_fails: bool,
    /// The types of the columns a table's rows are read with (empty for an intermediate
    /// result): when all are built-in, the rows come in binary and are printed here in the
    /// lossless text form (`ValueOutput`), not in the session's DateStyle or
    /// extra_float_digits, which the workers print with.
    #[serde(default)]
    pub column_types: Vec<u32>,
}

impl Broadcast {
    fn params(&self) -> std::ops::Range<i32> {
        self.first_param..self.first_param + self.columns as i32
    }
}

impl ShardScanPlan {
    pub fn from_deparsed(deparsed: &DeparsedQuery, anchor: pg_sys::Oid) -> Self {
        let pieces = deparsed
            .template
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(text) => (None, text.clone()),
                Piece::Relation(i) => (Some(*i), String::new()),
            })
            .collect();
        Self {
            pieces,
            relations: deparsed.relations.iter().map(|r| r.to_u32()).collect(),
            anchor: anchor.to_u32(),
            run_as: deparsed.run_as,
            ..Default::default()
        }
    }

    /// Tables to broadcast to the tasks; their readers take the statement's parameters too
    /// (their conditions may have left the task SQL).
    pub fn add_broadcasts(&mut self, broadcasts: Vec<Broadcast>) {
        for broadcast in &broadcasts {
            for &id in &broadcast.plan.params_used {
                if !self.params_used.contains(&id) {
                    self.params_used.push(id);
                }
            }
            self.max_param = self.max_param.max(broadcast.plan.max_param);
        }
        self.broadcasts.extend(broadcasts);
    }

    fn template(&self) -> Template {
        Template {
            pieces: self
                .pieces
                .iter()
                .map(|(slot, text)| match slot {
                    Some(i) => Piece::Relation(*i),
                    None => Piece::Text(text.clone()),
                })
                .collect(),
        }
    }
}

pub const SCAN_NAME: &CStr = c"ShardScan";

static mut SCAN_METHODS: pg_sys::CustomScanMethods =
    pg_sys::CustomScanMethods { CustomName: SCAN_NAME.as_ptr(), CreateCustomScanState: Some(create_state) };

static mut EXEC_METHODS: pg_sys::CustomExecMethods = pg_sys::CustomExecMethods {
    CustomName: SCAN_NAME.as_ptr(),
    BeginCustomScan: Some(begin),
    ExecCustomScan: Some(pg_sharding_shard_scan_exec),
    EndCustomScan: Some(end),
    ReScanCustomScan: Some(rescan),
    MarkPosCustomScan: None,
    RestrPosCustomScan: None,
    EstimateDSMCustomScan: None,
    InitializeDSMCustomScan: None,
    ReInitializeDSMCustomScan: None,
    InitializeWorkerCustomScan: None,
    ShutdownCustomScan: None,
    ExplainCustomScan: Some(explain),
};

pub fn register() {
    // SAFETY: called once from _PG_init; the methods are static.
    unsafe { pg_sys::RegisterCustomScanMethods(std::ptr::addr_of!(SCAN_METHODS)) };
}

/// A ShardScan plan node. `exprs` are the pruning values (`plan.prune` indexes them).
pub unsafe fn make_scan(
    plan: &ShardScanPlan,
    exprs: Vec<*mut pg_sys::Node>,
    scanrelid: u32,
    targetlist: *mut pg_sys::List,
    scan_tlist: *mut pg_sys::List,
    quals: *mut pg_sys::List,
) -> Result<*mut pg_sys::CustomScan> {
    let scan: *mut pg_sys::CustomScan = pg_sys::palloc0(std::mem::size_of::<pg_sys::CustomScan>()).cast();
    (*scan).scan.plan.type_ = pg_sys::NodeTag::T_CustomScan;
    (*scan).scan.scanrelid = scanrelid;
    (*scan).scan.plan.targetlist = targetlist;
    (*scan).scan.plan.qual = quals;
    (*scan).custom_scan_tlist = scan_tlist;
    // No backward scans: a cursor declared without SCROLL then reads forward only, and may
    // stream; a SCROLL cursor gets a Material node above the scan.
    (*scan).flags = 0;
    (*scan).methods = std::ptr::addr_of!(SCAN_METHODS);
    let json = serde_json::to_string(plan).map_err(|e| ShardingError::internal(e.to_string()))?;
    let json = CString::new(json).map_err(|e| ShardingError::internal(e.to_string()))?;
    (*scan).custom_private = pg_sys::lappend(std::ptr::null_mut(), pg_sys::makeString(pg_sys::pstrdup(json.as_ptr())).cast());
    let mut list: *mut pg_sys::List = std::ptr::null_mut();
    for expr in exprs {
        // Made executable as PostgreSQL's planner makes its expressions (a COLLATE clause
        // becomes a relabeling, operators get their functions): the values come straight
        // from the parse tree.
        list = pg_sys::lappend(list, pg_sys::expression_planner(expr.cast()).cast());
    }
    (*scan).custom_exprs = list;
    Ok(scan)
}

unsafe fn plan_of(scan: *const pg_sys::CustomScan) -> Result<Rc<ShardScanPlan>> {
    let private = (*scan).custom_private;
    if private.is_null() || (*private).length < 1 {
        return Err(ShardingError::internal("ShardScan without its plan"));
    }
    let node = (*(*private).elements).ptr_value as *mut pg_sys::String;
    decoded_plan(CStr::from_ptr((*node).sval).to_bytes())
}

/// Plans decoded from their JSON text, kept per backend: a prepared statement executes the
/// same plan text again and again, and decoding it each time was a measurable part of a
/// router query. Keyed by the whole text, so a changed plan is simply another entry.
const DECODED_PLANS: usize = 64;

thread_local! {
    static DECODED: std::cell::RefCell<std::collections::VecDeque<(Box<[u8]>, Rc<ShardScanPlan>)>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

pub fn decoded_plan(json: &[u8]) -> Result<Rc<ShardScanPlan>> {
    let found = DECODED.with(|d| {
        let mut decoded = d.borrow_mut();
        let position = decoded.iter().position(|(text, _)| &text[..] == json)?;
        // Most recently used first.
        let entry = decoded.remove(position)?;
        let plan = entry.1.clone();
        decoded.push_front(entry);
        Some(plan)
    });
    if let Some(plan) = found {
        return Ok(plan);
    }
    let plan: Rc<ShardScanPlan> = Rc::new(serde_json::from_slice(json).map_err(|e| ShardingError::internal(e.to_string()))?);
    DECODED.with(|d| {
        let mut decoded = d.borrow_mut();
        decoded.truncate(DECODED_PLANS - 1);
        decoded.push_front((json.into(), plan.clone()));
    });
    Ok(plan)
}

/// The plan of a ShardScan plan node and its expressions (pruning values, hoisted parameters).
pub unsafe fn plan_and_exprs(scan: *const pg_sys::CustomScan) -> Result<(ShardScanPlan, Vec<*mut pg_sys::Node>)> {
    let plan = (*plan_of(scan)?).clone();
    let exprs = crate::commands::utility::list_pointers::<pg_sys::Node>((*scan).custom_exprs);
    Ok((plan, exprs))
}

/// Adds broadcast tables to the ShardScan at the top of a plan made for a rewritten statement
/// (planner/broadcast.rs): their readers' parameters join the plan's.
pub unsafe fn add_broadcasts(plan: *mut pg_sys::Plan, broadcasts: Vec<Broadcast>) -> Result<()> {
    if !is_shard_scan(plan) {
        return Err(ShardingError::internal("a broadcast join without its ShardScan"));
    }
    let scan = plan.cast::<pg_sys::CustomScan>();
    let mut shard_plan = (*plan_of(scan)?).clone();
    shard_plan.add_broadcasts(broadcasts);
    let json = serde_json::to_string(&shard_plan).map_err(|e| ShardingError::internal(e.to_string()))?;
    let json = CString::new(json).map_err(|e| ShardingError::internal(e.to_string()))?;
    (*scan).custom_private = pg_sys::lappend(std::ptr::null_mut(), pg_sys::makeString(pg_sys::pstrdup(json.as_ptr())).cast());
    Ok(())
}

/// Whether a plan node is a ShardScan.
pub unsafe fn is_shard_scan(plan: *const pg_sys::Plan) -> bool {
    !plan.is_null()
        && (*plan).type_ == pg_sys::NodeTag::T_CustomScan
        && (*plan.cast::<pg_sys::CustomScan>()).methods == std::ptr::addr_of!(SCAN_METHODS)
}

#[repr(C)]
struct ShardScanState {
    css: pg_sys::CustomScanState,
    runtime: *mut Runtime,
}

struct Input {
    flinfo: pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    typmod: i32,
}

struct Runtime {
    plan: Rc<ShardScanPlan>,
    tasks: Vec<Task>,
    /// For EXPLAIN: the shard id of each task's anchor shard.
    task_shards: Vec<i64>,
    /// The role the statement ran as when the scan began: its tasks run as that role (or as
    /// the plan's `run_as`), whenever they start.
    role: u32,
    params: Vec<TaskParam>,
    store: *mut pg_sys::Tuplestorestate,
    store_slot: *mut pg_sys::TupleTableSlot,
    filled: bool,
    /// Rows the coordinator's copy of a reference table changed.
    local_affected: u64,
    /// An UPDATE/DELETE with RETURNING: the statement's count grows with each row returned
    /// (as ModifyTable's does), so that a caller stopping early (PL/pgSQL's INTO asks for two
    /// rows) sees as many rows counted as it received.
    count_returned: bool,
    /// How long the tasks took (EXPLAIN ANALYZE).
    elapsed: Option<std::time::Duration>,
    inputs: Vec<Input>,
    row_context: pg_sys::MemoryContext,
    /// Rows of each broadcast table sent to the tasks (EXPLAIN ANALYZE).
    broadcast_rows: Vec<usize>,
    /// The rows an UPDATE or DELETE chose here, which its tasks must all change.
    chosen_rows: Option<u64>,
    /// The executor reads this scan once, forward: its rows may go straight from the tasks to
    /// the executor (see `streams`).
    may_stream: bool,
    /// Tasks under way whose rows are read one at a time, as the executor asks for them.
    stream: Option<tasks::TaskRun>,
    /// The rows were streamed, not stored: a rescan runs the tasks again.
    streamed: bool,
    /// The broadcast tables were read into the tasks' parameters (once per execution).
    broadcast_done: bool,
    /// While the rows stream: the tables read (see `is_streamed`).
    streamed_tables: Option<StreamedTables>,
}

thread_local! {
    /// The tables of this backend's streams under way (once per stream).
    static STREAMED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A stream's tables, registered while it runs.
struct StreamedTables(Vec<u32>);

impl StreamedTables {
    fn register(tables: &[u32]) -> Self {
        STREAMED.with(|s| s.borrow_mut().extend_from_slice(tables));
        StreamedTables(tables.to_vec())
    }
}

impl Drop for StreamedTables {
    fn drop(&mut self) {
        STREAMED.with(|s| {
            let mut all = s.borrow_mut();
            for table in &self.0 {
                if let Some(at) = all.iter().position(|t| t == table) {
                    all.swap_remove(at);
                }
            }
        });
    }
}

/// Whether a stream of this backend still reads `relid`'s shards: its tasks not yet sent will
/// need the shards (a statement locking them exclusively in this transaction would make them
/// wait for ever).
pub fn is_streamed(relid: pg_sys::Oid) -> bool {
    STREAMED.with(|s| s.borrow().contains(&relid.to_u32()))
}

#[pg_guard]
unsafe extern "C-unwind" fn create_state(scan: *mut pg_sys::CustomScan) -> *mut pg_sys::Node {
    let state: *mut ShardScanState = pg_sys::palloc0(std::mem::size_of::<ShardScanState>()).cast();
    (*state).css.ss.ps.type_ = pg_sys::NodeTag::T_CustomScanState;
    (*state).css.flags = (*scan).flags;
    (*state).css.methods = std::ptr::addr_of!(EXEC_METHODS);
    state.cast()
}

#[pg_guard]
unsafe extern "C-unwind" fn drop_runtime(arg: *mut std::ffi::c_void) {
    let state = arg as *mut ShardScanState;
    if !(*state).runtime.is_null() {
        drop(Box::from_raw((*state).runtime));
        (*state).runtime = std::ptr::null_mut();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(node: *mut pg_sys::CustomScanState, estate: *mut pg_sys::EState, eflags: i32) {
    let state = node as *mut ShardScanState;
    let scan = (*node).ss.ps.plan as *mut pg_sys::CustomScan;
    let plan = plan_of(scan).or_raise();
    let params = task_params(node, estate, &plan).or_raise();
    // The role running the statement now, which its tasks keep when they start later (the
    // FETCH of a cursor a SECURITY DEFINER function opened).
    let role = pg_sys::GetUserId().to_u32();
    let (tasks, task_shards) = if plan.statement.is_some() { (Vec::new(), Vec::new()) } else { plan_tasks(node, &plan, role).or_raise() };
    if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 == 0 {
        if plan.modify || plan.writes {
            crate::stats::count_writes(&task_shards, 1);
        } else {
            crate::stats::count_reads(&task_shards);
        }
    }

    if plan.reference_write {
        let scan = (*node).ss.ps.plan as *mut pg_sys::CustomScan;
        let child = (*(*(*scan).custom_plans).elements).ptr_value as *mut pg_sys::Plan;
        let child_state = pg_sys::ExecInitNode(child, estate, eflags);
        (*node).custom_ps = pg_sys::lappend(std::ptr::null_mut(), child_state.cast());
    }
    let slot = (*node).ss.ss_ScanTupleSlot;
    let tupdesc = (*slot).tts_tupleDescriptor;
    if !plan.binary {
        text_values_exact(tupdesc).or_raise();
    }
    let mut inputs = Vec::new();
    for i in 0..(*tupdesc).natts as usize {
        let attr = (*tupdesc).attrs.as_ptr().add(i);
        let mut function = pg_sys::InvalidOid;
        let mut ioparam = pg_sys::InvalidOid;
        if plan.binary {
            pg_sys::getTypeBinaryInputInfo((*attr).atttypid, &mut function, &mut ioparam);
        } else {
            pg_sys::getTypeInputInfo((*attr).atttypid, &mut function, &mut ioparam);
        }
        let mut input = Input { flinfo: std::mem::zeroed(), ioparam, typmod: (*attr).atttypmod };
        pg_sys::fmgr_info(function, &mut input.flinfo);
        inputs.push(input);
    }
    let random_access = eflags & (pg_sys::EXEC_FLAG_BACKWARD | pg_sys::EXEC_FLAG_MARK) as i32 != 0;
    let runtime = Runtime {
        plan,
        tasks,
        task_shards,
        role,
        params,
        store: pg_sys::tuplestore_begin_heap(random_access, false, *std::ptr::addr_of!(pg_sys::work_mem)),
        store_slot: pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple),
        filled: false,
        elapsed: None,
        local_affected: 0,
        count_returned: false,
        inputs,
        broadcast_rows: Vec::new(),
        chosen_rows: None,
        may_stream: crate::guc::STREAM_ROWS.get()
            && (*estate).es_instrument == 0
            && eflags
                & (pg_sys::EXEC_FLAG_BACKWARD | pg_sys::EXEC_FLAG_MARK | pg_sys::EXEC_FLAG_REWIND | pg_sys::EXEC_FLAG_EXPLAIN_ONLY) as i32
                == 0,
        stream: None,
        streamed: false,
        broadcast_done: false,
        streamed_tables: None,
        row_context: pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"ShardScan rows".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        ),
    };
    (*state).runtime = Box::into_raw(Box::new(runtime));
    // The runtime is Rust memory: freed with the executor's memory, also when an error ends
    // the query before EndCustomScan.
    let callback: *mut pg_sys::MemoryContextCallback =
        pg_sys::palloc0(std::mem::size_of::<pg_sys::MemoryContextCallback>()).cast();
    (*callback).func = Some(drop_runtime);
    (*callback).arg = state.cast();
    pg_sys::MemoryContextRegisterResetCallback((*estate).es_query_cxt, callback);

    // A statement of its own runs now, once, whether or not its rows are read later.
    let runtime = &mut *(*state).runtime;
    if let Some(statement) = runtime.plan.statement.clone() {
        if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 == 0 {
            let started = std::time::Instant::now();
            run_query(node, &statement, 0, 0, runtime.store).or_raise();
            runtime.filled = true;
            runtime.elapsed = Some(started.elapsed());
        }
    }
}

/// The statement's parameter values for the workers: built-in types in binary, others as
/// text with the type left for the worker to infer.
unsafe fn task_params(node: *mut pg_sys::CustomScanState, estate: *mut pg_sys::EState, plan: &ShardScanPlan) -> Result<Vec<TaskParam>> {
    let list = (*estate).es_param_list_info;
    let mut params = Vec::with_capacity(plan.max_param.max(0) as usize);
    for id in 1..=plan.max_param {
        let unused = TaskParam { type_oid: pg_sys::TEXTOID.to_u32(), value: None, format: 0 };
        // Broadcast rows: filled when the tasks run (broadcast()).
        if plan.broadcasts.iter().any(|b| b.params().contains(&id)) {
            params.push(unused);
            continue;
        }
        let (type_oid, value, isnull) = if let Some(&(_, index)) = plan.hoisted.iter().find(|(h, _)| *h == id) {
            let expr = plan_expr(node, index)?;
            let state = pg_sys::ExecInitExpr(expr, &mut (*node).ss.ps);
            let mut isnull = false;
            let value = pg_sys::ExecEvalExprSwitchContext(state, (*node).ss.ps.ps_ExprContext, &mut isnull);
            (pg_sys::exprType(expr.cast()), value, isnull)
        } else {
            if !plan.params_used.contains(&id) || list.is_null() || id > (*list).numParams {
                params.push(unused);
                continue;
            }
            let mut workspace: pg_sys::ParamExternData = std::mem::zeroed();
            let data: *mut pg_sys::ParamExternData = match (*list).paramFetch {
                Some(fetch) => fetch(list, id, false, &mut workspace),
                None => (*list).params.as_mut_ptr().add(id as usize - 1),
            };
            ((*data).ptype, (*data).value, (*data).isnull)
        };
        if type_oid == pg_sys::InvalidOid {
            params.push(unused);
            continue;
        }
        let builtin = type_oid.to_u32() < pg_sys::FirstNormalObjectId;
        let value = if isnull {
            None
        } else if builtin {
            let _encoding = crate::connection::DatabaseEncoding::enter();
            let mut send = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeBinaryOutputInfo(type_oid, &mut send, &mut varlena);
            let bytes = pg_sys::OidSendFunctionCall(send, value);
            let len = pgrx::varsize_any_exhdr(bytes.cast());
            Some(std::slice::from_raw_parts(pgrx::vardata_any(bytes.cast()).cast::<u8>(), len).to_vec())
        } else {
            let _settings = TransmissionSettings::enter();
            let mut output = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
            let text = CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, value));
            let mut bytes = text.to_bytes().to_vec();
            bytes.push(0);
            Some(bytes)
        };
        params.push(if builtin {
            TaskParam { type_oid: type_oid.to_u32(), value, format: 1 }
        } else {
            TaskParam { type_oid: 0, value, format: 0 }
        });
    }
    Ok(params)
}

/// The plan's `index`th expression (pruning values, hoisted parameters).
unsafe fn plan_expr(node: *mut pg_sys::CustomScanState, index: usize) -> Result<*mut pg_sys::Expr> {
    let scan = (*node).ss.ps.plan as *mut pg_sys::CustomScan;
    let exprs = (*scan).custom_exprs;
    if exprs.is_null() || index >= (*exprs).length as usize {
        return Err(ShardingError::internal("a ShardScan plan refers to an expression it does not carry"));
    }
    Ok((*(*exprs).elements.add(index)).ptr_value as *mut pg_sys::Expr)
}

/// Shard indexes left after pruning with the values of this execution.
unsafe fn pruned_indexes(node: *mut pg_sys::CustomScanState, plan: &ShardScanPlan, anchor: &DistributedTable) -> Result<Vec<usize>> {
    let all: Vec<usize> = (0..anchor.shards.len()).collect();
    if plan.prune.is_empty() {
        return Ok(all);
    }
    let econtext = (*node).ss.ps.ps_ExprContext;
    let mut keep = all;
    for disjunction in &plan.prune {
        let mut matched: Vec<usize> = Vec::new();
        for &(index, is_array) in disjunction {
            let expr = plan_expr(node, index)?;
            let expr_state = pg_sys::ExecInitExpr(expr, &mut (*node).ss.ps);
            let mut isnull = false;
            let value = pg_sys::ExecEvalExprSwitchContext(expr_state, econtext, &mut isnull);
            if isnull {
                continue;
            }
            let value_type = pg_sys::exprType(expr.cast());
            let element_type = if is_array { pg_sys::get_element_type(value_type) } else { value_type };
            let Some(kind) = crate::routing::DistKind::of_type(element_type) else {
                // Cannot hash this value here: prune nothing for this condition.
                matched = (0..anchor.shards.len()).collect();
                break;
            };
            let kind = crate::routing::DistKind::hashing(anchor.distribution_kind, kind);
            let mut add = |datum: pg_sys::Datum| {
                let hash = crate::routing::hash_datum(datum, kind);
                if let Some(position) = anchor.shards.iter().position(|s| s.interval.is_some_and(|i| i.contains(hash))) {
                    if !matched.contains(&position) {
                        matched.push(position);
                    }
                }
            };
            if is_array {
                let array = pg_sys::pg_detoast_datum(value.cast_mut_ptr()) as *mut pg_sys::ArrayType;
                let mut typlen = 0i16;
                let mut byval = false;
                let mut align = 0 as std::ffi::c_char;
                pg_sys::get_typlenbyvalalign((*array).elemtype, &mut typlen, &mut byval, &mut align);
                let mut elements: *mut pg_sys::Datum = std::ptr::null_mut();
                let mut nulls: *mut bool = std::ptr::null_mut();
                let mut count = 0;
                pg_sys::deconstruct_array(array, (*array).elemtype, typlen.into(), byval, align, &mut elements, &mut nulls, &mut count);
                for i in 0..count as usize {
                    if !*nulls.add(i) {
                        add(*elements.add(i));
                    }
                }
            } else {
                add(value);
            }
        }
        keep.retain(|i| matched.contains(i));
    }
    Ok(keep)
}

/// `role`: the role the statement runs as (see `Runtime::role`).
unsafe fn plan_tasks(node: *mut pg_sys::CustomScanState, plan: &ShardScanPlan, role: u32) -> Result<(Vec<Task>, Vec<i64>)> {
    let anchor = cache::table(pg_sys::Oid::from(plan.anchor))?
        .ok_or_else(|| ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "a table of this plan is no longer distributed"))?;
    let relations: Vec<std::rc::Rc<DistributedTable>> = plan
        .relations
        .iter()
        .map(|&oid| {
            cache::table(pg_sys::Oid::from(oid))?.ok_or_else(|| {
                ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "a table of this plan is no longer distributed")
            })
        })
        .collect::<Result<_>>()?;
    let nodes = cache::nodes()?;
    let template = plan.template();
    let mut tasks = Vec::new();
    let mut shard_ids = Vec::new();
    let mut indexes = pruned_indexes(node, plan, &anchor)?;
    if indexes.is_empty() && plan.at_least_one && !anchor.shards.is_empty() {
        indexes.push(0);
    }
    // A write of a reference table goes to every copy; anything else to one placement.
    let targets: Vec<(usize, i32)> = if plan.reference_write {
        anchor.shards.first().map(|s| s.placements.iter().map(|&n| (0, n)).collect()).unwrap_or_default()
    } else {
        indexes
            .into_iter()
            .map(|index| {
                let shard = &anchor.shards[index];
                // A reference table read on the coordinator's own copy, when it has one.
                let local = (anchor.method == crate::catalog::tables::Method::Reference)
                    .then(|| shard.placements.iter().find(|&&n| nodes.iter().any(|x| x.node_id == n && x.is_coordinator)))
                    .flatten();
                local.or(shard.placements.first()).map(|&n| (index, n)).ok_or_else(|| {
                    ShardingError::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("shard {} has no placement", shard.shard_id))
                })
            })
            .collect::<Result<_>>()?
    };
    for (index, node_id) in targets {
        let shard = &anchor.shards[index];
        let target = nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| ShardingError::internal(format!("node {node_id} of shard {} is not registered", shard.shard_id)))?;
        let mut failure = None;
        let sql = template.render(|slot| {
            let table = &relations[slot];
            let shard = if table.method == crate::catalog::tables::Method::Reference {
                table.shards.first()
            } else {
                table.shards.get(index)
            };
            match shard {
                Some(shard) => crate::deparse::quote::qualified(
                    &table.schema,
                    &sharding_core::table_def::shard_object_name(&table.name, shard.shard_id),
                ),
                None => {
                    failure = Some(ShardingError::internal(format!("{} has no shard {index}", table.name)));
                    String::new()
                }
            }
        });
        if let Some(error) = failure {
            return Err(error);
        }
        tasks.push(Task {
            node: target.clone(),
            sql: CString::new(sql).map_err(|e| ShardingError::internal(e.to_string()))?,
            params: None,
            run_as: if plan.run_as != 0 { plan.run_as } else { role },
        });
        shard_ids.push(shard.shard_id);
    }
    Ok((tasks, shard_ids))
}

unsafe fn fill(node: *mut pg_sys::CustomScanState, runtime: &mut Runtime) -> Result<()> {
    let tupdesc = (*(*node).ss.ss_ScanTupleSlot).tts_tupleDescriptor;
    let natts = (*tupdesc).natts as usize;
    let mut values = vec![pg_sys::Datum::from(0usize); natts];
    let mut nulls = vec![true; natts];
    let store = runtime.store;
    let binary = runtime.plan.binary;
    let row_context = runtime.row_context;
    // Writes and row locks belong to the distributed transaction. A single-shard write
    // without RETURNING outside a transaction block is atomic on its own: it commits on the
    // worker in the same round trip (nothing can fail here after it). Reads join the remote
    // transactions where the transaction block needs it (REPEATABLE READ and up, SET LOCAL)
    // or where it wrote already; otherwise they run in the nodes' autocommit.
    let in_block = pg_sys::IsTransactionBlock();
    let read_only = *std::ptr::addr_of!(pg_sys::XactReadOnly);
    // Not with rows chosen here: their count is checked after the tasks ran.
    let autocommit_write = runtime.plan.modify
        && !runtime.plan.reference_write
        && runtime.plan.broadcasts.iter().all(|b| b.target_rows == 0)
        && runtime.tasks.len() == 1
        && natts == 0
        && !in_block
        && !read_only;
    let access = if runtime.plan.locks_rows || runtime.plan.writes || (runtime.plan.modify && !autocommit_write) {
        remote::Access::Write
    } else {
        remote::read_access()
    };
    let started = std::time::Instant::now();
    if runtime.plan.reference_write {
        change_coordinator_copy(node, runtime)?;
    }
    if !runtime.plan.broadcasts.is_empty() && !runtime.broadcast_done {
        // Reading the broadcast tables writes nothing: it joins the distributed transaction
        // only where a read would.
        broadcast(node, runtime, remote::read_access())?;
        runtime.broadcast_done = true;
    }
    let inputs = &mut runtime.inputs;
    let reference_write = runtime.plan.reference_write;
    let affected = tasks::run(&runtime.tasks, &runtime.params, binary, access, |result| {
        if reference_write {
            // Its RETURNING rows are the coordinator's copy's.
            return Err(ShardingError::internal("a task changing a copy of a reference table returned rows"));
        }
        decode_row(result, inputs, binary, row_context, &mut values, &mut nulls)?;
        pg_sys::tuplestore_putvalues(store, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        Ok(())
    })
    .map_err(|error| {
        // A single-shard write in the node's autocommit whose connection broke may have
        // committed there: say so (08007) rather than report a failure.
        match (&runtime.tasks[..], autocommit_write && error.code == PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE) {
            ([task], true) => remote::unknown_outcome(&format!("{}:{}", task.node.host, task.node.port), &error.message),
            _ => error,
        }
    })?;
    if let Some(chosen) = runtime.chosen_rows {
        if affected != chosen {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                "could not serialize access due to concurrent update",
            )
            .detail(format!(
                "{} of the {chosen} rows this statement chose to change were changed or deleted by another transaction meanwhile.",
                chosen.saturating_sub(affected)
            ))
            .hint("Retry the statement."));
        }
    }
    if runtime.plan.reference_write {
        let copies = runtime.tasks.len() as u64;
        if affected != runtime.local_affected * copies {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                "the copies of a reference table differ: the statement changed a different number of rows on the workers",
            )
            .detail(format!("{} row(s) here, {affected} over {copies} worker copies", runtime.local_affected))
            .hint("The statement was rolled back everywhere. Compare the copies, or recreate the reference table."));
        }
    }
    let estate = (*node).ss.ps.state;
    let returning = natts > 0 && !(*estate).es_plannedstmt.is_null() && (*(*estate).es_plannedstmt).hasReturning;
    if runtime.plan.modify && !runtime.plan.reference_write && !returning {
        (*estate).es_processed += affected;
    }
    if (runtime.plan.modify || runtime.plan.reference_write) && returning {
        // The coordinator copy's rows were counted as it changed them: counted as returned instead.
        (*estate).es_processed = (*estate).es_processed.saturating_sub(runtime.local_affected);
        runtime.count_returned = true;
    }
    runtime.filled = true;
    runtime.elapsed = Some(started.elapsed());
    Ok(())
}

/// Decodes a task's row into `values` and `nulls` (one entry per input), allocating in
/// `row_context`, which is reset first: the previous row's values are gone.
unsafe fn decode_row(
    result: &crate::connection::RemoteResult,
    inputs: &mut [Input],
    binary: bool,
    row_context: pg_sys::MemoryContext,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
) -> Result<()> {
    if result.columns() != inputs.len() {
        return Err(ShardingError::internal(format!("a task returned {} columns, expected {}", result.columns(), inputs.len())));
    }
    pg_sys::MemoryContextReset(row_context);
    let _encoding = binary.then(crate::connection::DatabaseEncoding::enter);
    let previous = pg_sys::MemoryContextSwitchTo(row_context);
    for (i, input) in inputs.iter_mut().enumerate() {
        match result.value(i) {
            None => nulls[i] = true,
            Some(bytes) => {
                nulls[i] = false;
                values[i] = if binary {
                    let mut buffer = pg_sys::StringInfoData {
                        data: bytes.as_ptr() as *mut std::ffi::c_char,
                        len: bytes.len() as i32,
                        maxlen: bytes.len() as i32 + 1,
                        cursor: 0,
                    };
                    pg_sys::ReceiveFunctionCall(&mut input.flinfo, &mut buffer, input.ioparam, input.typmod)
                } else {
                    pg_sys::InputFunctionCall(&mut input.flinfo, bytes.as_ptr() as *mut std::ffi::c_char, input.ioparam, input.typmod)
                };
            }
        }
    }
    pg_sys::MemoryContextSwitchTo(previous);
    Ok(())
}

/// Whether the scan's rows may go straight from the tasks to the executor: a read of several
/// shards outside the distributed transaction (it needs connections of its own: a read that
/// must see the transaction's writes, or its snapshot, uses the node sessions, which other
/// statements may need while the rows are read), read once, forward.
fn streams(runtime: &Runtime) -> bool {
    let plan = &runtime.plan;
    runtime.may_stream
        && runtime.tasks.len() > 1
        && !(plan.modify || plan.writes || plan.locks_rows || plan.reference_write)
        && plan.statement.is_none()
        && plan.broadcasts.iter().all(|b| b.target_rows == 0)
        && remote::read_access() == remote::Access::Autocommit
        && runtime.tasks.iter().all(|task| !remote::in_transaction_on(&task.node))
}

/// Starts the tasks of a streamed scan (after reading its broadcast tables); false when the
/// nodes have no connections to spare for it (the rows are then gathered).
unsafe fn start_stream(node: *mut pg_sys::CustomScanState, runtime: &mut Runtime) -> Result<bool> {
    // Broadcast rows meant for some shards only leave the others without a task: first.
    if !runtime.plan.broadcasts.is_empty() && !runtime.broadcast_done {
        broadcast(node, runtime, remote::Access::Autocommit)?;
        runtime.broadcast_done = true;
    }
    let Some(run) = tasks::TaskRun::start_streamed(&runtime.tasks)? else { return Ok(false) };
    runtime.stream = Some(run);
    runtime.streamed = true;
    runtime.streamed_tables = Some(StreamedTables::register(&runtime.plan.relations));
    Ok(true)
}

/// The next row of a streamed scan into the scan slot, or the empty slot at the end.
unsafe fn next_streamed(node: *mut pg_sys::CustomScanState, runtime: &mut Runtime) -> Result<*mut pg_sys::TupleTableSlot> {
    let slot = (*node).ss.ss_ScanTupleSlot;
    pg_sys::ExecClearTuple(slot);
    let Runtime { stream, tasks, params, inputs, plan, row_context, .. } = runtime;
    let Some(run) = stream.as_mut() else { return Ok(slot) };
    let natts = inputs.len();
    let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
    let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
    let mut got = false;
    let finished = run.pump(tasks, params, plan.binary, |result| {
        decode_row(result, inputs, plan.binary, *row_context, values, nulls)?;
        got = true;
        Ok(tasks::Flow::Pause)
    })?;
    if got {
        pg_sys::ExecStoreVirtualTuple(slot);
    } else if finished {
        runtime.stream = None;
        runtime.streamed_tables = None;
        runtime.filled = true;
    }
    Ok(slot)
}

/// The coordinator's half of a reference-table write, before the workers': runs the child
/// plan, which changes the coordinator's copy (its row locks come first, so that concurrent
/// writes of the table wait here rather than on some worker), and stores the rows it returns.
/// With rows replicated by key, their first columns become the tasks' parameters, and without
/// rows changed here the tasks have nothing to do.
unsafe fn change_coordinator_copy(node: *mut pg_sys::CustomScanState, runtime: &mut Runtime) -> Result<()> {
    let estate = (*node).ss.ps.state;
    let child = (*(*(*node).custom_ps).elements).ptr_value as *mut pg_sys::PlanState;
    let before = (*estate).es_processed;
    loop {
        let slot = pg_sys::ExecProcNode(child);
        if slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
            break;
        }
        pg_sys::tuplestore_puttupleslot(runtime.store, slot);
    }
    runtime.local_affected = (*estate).es_processed - before;
    let columns = runtime.plan.replicated_columns;
    if columns > 0 {
        if runtime.local_affected == 0 {
            runtime.tasks.clear();
            runtime.task_shards.clear();
        } else {
            let mut arrays = vec![ArrayLiteral::new(); columns];
            let mut text = TextColumns::new((*runtime.store_slot).tts_tupleDescriptor, columns);
            let _settings = TransmissionSettings::enter();
            while pg_sys::tuplestore_gettupleslot(runtime.store, true, false, runtime.store_slot) {
                text.push(runtime.store_slot, &mut arrays);
                if text.bytes > INTERMEDIATE_RESULT_LIMIT {
                    return Err(ShardingError::new(
                        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                        format!("the rows changed in a reference table exceed {} MB", INTERMEDIATE_RESULT_LIMIT / (1024 * 1024)),
                    )
                    .hint("Change fewer rows per statement."));
                }
            }
            pg_sys::tuplestore_rescan(runtime.store);
            for (i, array) in arrays.into_iter().enumerate() {
                let mut value = array.finish();
                value.push(0);
                runtime.params[i] = TaskParam { type_oid: pg_sys::TEXTOID.to_u32(), value: Some(value), format: 0 };
            }
        }
    }
    if (*(*node).ss.ps.plan).targetlist.is_null() {
        pg_sys::tuplestore_clear(runtime.store);
    }
    Ok(())
}

/// Values in the workers' text form, appended column by column to text arrays (under
/// `TransmissionSettings`, which the caller enters).
struct TextColumns {
    outputs: Vec<pg_sys::FmgrInfo>,
    context: pg_sys::MemoryContext,
    /// Text so far, in bytes.
    bytes: usize,
}

impl TextColumns {
    /// For the first `columns` columns of rows of `tupdesc`.
    unsafe fn new(tupdesc: pg_sys::TupleDesc, columns: usize) -> Self {
        let mut outputs = Vec::with_capacity(columns);
        for i in 0..columns {
            let attr = (*tupdesc).attrs.as_ptr().add(i);
            let mut function = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo((*attr).atttypid, &mut function, &mut varlena);
            let mut flinfo: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info(function, &mut flinfo);
            outputs.push(flinfo);
        }
        let context = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"values as text".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        TextColumns { outputs, context, bytes: 0 }
    }

    /// Appends the slot's values to `arrays`, one per column.
    unsafe fn push(&mut self, slot: *mut pg_sys::TupleTableSlot, arrays: &mut [ArrayLiteral]) {
        pg_sys::slot_getallattrs(slot);
        pg_sys::MemoryContextReset(self.context);
        let previous = pg_sys::MemoryContextSwitchTo(self.context);
        for (i, (array, output)) in arrays.iter_mut().zip(self.outputs.iter_mut()).enumerate() {
            if *(*slot).tts_isnull.add(i) {
                array.push(None);
            } else {
                let value = CStr::from_ptr(pg_sys::OutputFunctionCall(output, *(*slot).tts_values.add(i)));
                self.bytes += value.to_bytes().len();
                array.push(Some(value.to_bytes()));
            }
        }
        pg_sys::MemoryContextSwitchTo(previous);
    }
}

impl Drop for TextColumns {
    fn drop(&mut self) {
        // SAFETY: the context was created by `new` and nothing else refers to it.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// Reads the rows of every broadcast table of the plan and puts them into the tasks'
/// parameters: one text array per column (values in the workers' text form, read back there by
/// the column type's input function).
unsafe fn broadcast(node: *mut pg_sys::CustomScanState, runtime: &mut Runtime, access: remote::Access) -> Result<()> {
    let plan = runtime.plan.clone();
    runtime.broadcast_rows.clear();
    // Rows meant for one shard each (routed broadcast tables, the rows an UPDATE or DELETE
    // changes): by shard.
    let mut per_shard: Vec<(&Broadcast, Vec<ResultGroup>)> = Vec::new();
    for broadcast in &plan.broadcasts {
        let mut arrays = vec![ArrayLiteral::new(); broadcast.columns];
        let mut rows = 0usize;
        if let Some(query) = &broadcast.query {
            let route = if broadcast.target_rows != 0 || broadcast.route_column.is_some() {
                Some(cache::table(pg_sys::Oid::from(plan.anchor))?.ok_or_else(|| {
                    ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "a table of this plan is no longer distributed")
                })?)
            } else {
                None
            };
            let groups = intermediate_result(node, broadcast, query, route.as_deref())?;
            rows = groups.iter().map(|g| g.rows).sum();
            if route.is_some() {
                if broadcast.target_rows != 0 {
                    runtime.chosen_rows = Some(rows as u64);
                }
                per_shard.push((broadcast, groups));
                runtime.broadcast_rows.push(rows);
                continue;
            }
            if let Some(group) = groups.into_iter().next() {
                arrays = group.arrays;
            }
        } else {
            let (tasks, _) = plan_tasks(node, &broadcast.plan, runtime.role)?;
            let used = (broadcast.plan.max_param.max(0) as usize).min(runtime.params.len());
            let mut router = match broadcast.route_column {
                Some(column) => Some(RowRouter::new(&plan, broadcast, column)?),
                None => None,
            };
            let mut printer = BinaryToText::new(&broadcast.column_types);
            let binary = printer.is_some();
            tasks::run(&tasks, &runtime.params[..used], binary, access, |result| {
                if result.columns() != broadcast.columns {
                    return Err(ShardingError::internal(format!(
                        "a broadcast task returned {} columns, expected {}",
                        result.columns(),
                        broadcast.columns
                    )));
                }
                let printed = match printer.as_mut() {
                    Some(printer) => Some(printer.print(result)?),
                    None => None,
                };
                let value = |i: usize| match &printed {
                    Some(values) => values[i].as_deref(),
                    None => result.value(i),
                };
                let arrays = match router.as_mut() {
                    None => &mut arrays,
                    Some(router) => match router.group(value(router.column))? {
                        Some(group) => group,
                        None => return Ok(()),
                    },
                };
                for (i, array) in arrays.iter_mut().enumerate() {
                    array.push(value(i));
                }
                rows += 1;
                Ok(())
            })?;
            if let Some(mut router) = router {
                per_shard.push((broadcast, std::mem::take(&mut router.groups)));
                runtime.broadcast_rows.push(rows);
                continue;
            }
        }
        set_arrays(&mut runtime.params, broadcast, &arrays)?;
        runtime.broadcast_rows.push(rows);
    }
    if !per_shard.is_empty() {
        crate::transaction::fault::point("after_chosen_rows");
    }
    // Each task gets its shard's rows; a task whose shard has none has nothing to do.
    for (broadcast, groups) in per_shard {
        let mut kept = Vec::new();
        let mut kept_shards = Vec::new();
        let mut spare = None;
        for (mut task, shard_id) in std::mem::take(&mut runtime.tasks).into_iter().zip(std::mem::take(&mut runtime.task_shards)) {
            let Some(group) = groups.iter().find(|g| g.shard == shard_id) else {
                if spare.is_none() {
                    spare = Some((task, shard_id));
                }
                continue;
            };
            let mut params = task.params.take().unwrap_or_else(|| runtime.params.clone());
            set_arrays(&mut params, broadcast, &group.arrays)?;
            task.params = Some(params);
            kept.push(task);
            kept_shards.push(shard_id);
        }
        // A whole SELECT still needs one task's answer (count(*) of nothing is a row).
        if kept.is_empty() && runtime.plan.at_least_one {
            if let Some((mut task, shard_id)) = spare {
                let mut params = task.params.take().unwrap_or_else(|| runtime.params.clone());
                set_arrays(&mut params, broadcast, &vec![ArrayLiteral::new(); broadcast.columns])?;
                task.params = Some(params);
                kept.push(task);
                kept_shards.push(shard_id);
            }
        }
        runtime.tasks = kept;
        runtime.task_shards = kept_shards;
    }
    Ok(())
}

/// Puts a broadcast's rows, one text array per column, into its parameters among `params`.
fn set_arrays(params: &mut [TaskParam], broadcast: &Broadcast, arrays: &[ArrayLiteral]) -> Result<()> {
    for (id, array) in broadcast.params().zip(arrays) {
        let mut value = array.clone().finish();
        value.push(0);
        let slot = params
            .get_mut(id as usize - 1)
            .ok_or_else(|| ShardingError::internal("a broadcast parameter lies beyond the plan's parameters"))?;
        *slot = TaskParam { type_oid: pg_sys::TEXTOID.to_u32(), value: Some(value), format: 0 };
    }
    Ok(())
}

/// Sorts the rows of a routed broadcast table by the shard their join key hashes to.
struct RowRouter {
    table: Rc<DistributedTable>,
    kind: crate::routing::DistKind,
    column: usize,
    columns: usize,
    input: pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    context: pg_sys::MemoryContext,
    /// The key's text with its terminating NUL, reused from row to row.
    text: Vec<u8>,
    groups: Vec<ResultGroup>,
}

impl RowRouter {
    unsafe fn new(plan: &ShardScanPlan, broadcast: &Broadcast, column: usize) -> Result<Self> {
        let table = cache::table(pg_sys::Oid::from(plan.anchor))?
            .ok_or_else(|| ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "a table of this plan is no longer distributed"))?;
        let type_oid = pg_sys::Oid::from(broadcast.route_type);
        let kind = crate::routing::DistKind::of_type(type_oid).ok_or_else(|| ShardingError::internal("a broadcast routed by a value that has no hash"))?;
        let kind = crate::routing::DistKind::hashing(table.distribution_kind, kind);
        let (mut function, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(type_oid, &mut function, &mut ioparam);
        let mut input: pg_sys::FmgrInfo = std::mem::zeroed();
        pg_sys::fmgr_info(function, &mut input);
        let context = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"broadcast routing".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        Ok(RowRouter { table, kind, column, columns: broadcast.columns, input, ioparam, context, text: Vec::new(), groups: Vec::new() })
    }

    /// The arrays of the shard a row goes to, by the text of its key; `None` for a row no task
    /// can use (NULL key).
    unsafe fn group(&mut self, key: Option<&[u8]>) -> Result<Option<&mut Vec<ArrayLiteral>>> {
        let Some(text) = key else { return Ok(None) };
        self.text.clear();
        self.text.extend_from_slice(text);
        self.text.push(0);
        pg_sys::MemoryContextReset(self.context);
        let previous = pg_sys::MemoryContextSwitchTo(self.context);
        let value = pg_sys::InputFunctionCall(&mut self.input, self.text.as_mut_ptr().cast(), self.ioparam, -1);
        let shard = crate::routing::shard_for_value(&self.table, Some(value), self.kind);
        pg_sys::MemoryContextSwitchTo(previous);
        let group = ResultGroup::of_shard(&mut self.groups, shard?, self.columns);
        group.rows += 1;
        Ok(Some(&mut group.arrays))
    }
}

/// Values that came in binary, printed in the lossless text form the workers read back.
struct BinaryToText {
    /// Receive and output functions per column, with the receive function's I/O parameter.
    columns: Vec<(pg_sys::FmgrInfo, pg_sys::Oid, pg_sys::FmgrInfo)>,
    context: pg_sys::MemoryContext,
}

impl BinaryToText {
    /// `None` unless every column has a built-in type (whose binary form is the same on every
    /// node).
    unsafe fn new(types: &[u32]) -> Option<Self> {
        if types.is_empty() || types.iter().any(|&t| t >= pg_sys::FirstNormalObjectId) {
            return None;
        }
        let mut columns = Vec::with_capacity(types.len());
        for &type_oid in types {
            let (mut receive, mut ioparam, mut output, mut varlena) = (pg_sys::InvalidOid, pg_sys::InvalidOid, pg_sys::InvalidOid, false);
            pg_sys::getTypeBinaryInputInfo(pg_sys::Oid::from(type_oid), &mut receive, &mut ioparam);
            pg_sys::getTypeOutputInfo(pg_sys::Oid::from(type_oid), &mut output, &mut varlena);
            let mut receive_info: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info(receive, &mut receive_info);
            let mut output_info: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info(output, &mut output_info);
            columns.push((receive_info, ioparam, output_info));
        }
        let context = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"broadcast values".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        Some(BinaryToText { columns, context })
    }

    /// The row's values as text (NUL-free byte strings; `None` for NULL).
    unsafe fn print(&mut self, row: &crate::connection::RemoteResult) -> Result<Vec<Option<Vec<u8>>>> {
        pg_sys::MemoryContextReset(self.context);
        let previous = pg_sys::MemoryContextSwitchTo(self.context);
        let _encoding = crate::connection::DatabaseEncoding::enter();
        let _output = crate::deparse::query::ValueOutput::enter();
        let mut values = Vec::with_capacity(self.columns.len());
        for (i, (receive, ioparam, output)) in self.columns.iter_mut().enumerate() {
            values.push(row.value(i).map(|bytes| {
                let mut buffer = pg_sys::StringInfoData {
                    data: bytes.as_ptr() as *mut std::ffi::c_char,
                    len: bytes.len() as i32,
                    maxlen: bytes.len() as i32 + 1,
                    cursor: 0,
                };
                let datum = pg_sys::ReceiveFunctionCall(receive, &mut buffer, *ioparam, -1);
                CStr::from_ptr(pg_sys::OutputFunctionCall(output, datum)).to_bytes().to_vec()
            }));
        }
        pg_sys::MemoryContextSwitchTo(previous);
        Ok(values)
    }
}

impl Drop for BinaryToText {
    fn drop(&mut self) {
        // SAFETY: the context was created by `new` and nothing else refers to it.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

impl Drop for RowRouter {
    fn drop(&mut self) {
        // SAFETY: the context was created by `new` and nothing else refers to it.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// The rows of an intermediate result, as text arrays (one per column): all of them, or those
/// of one shard of the table they are routed by.
struct ResultGroup {
    shard: i64,
    rows: usize,
    arrays: Vec<ArrayLiteral>,
    /// The ctids of its rows so far (block and offset), when routed: a row found twice is
    /// sent once.
    ctids: std::collections::HashSet<(u32, u16)>,
}

impl ResultGroup {
    fn new(shard: i64, columns: usize) -> Self {
        ResultGroup { shard, rows: 0, arrays: vec![ArrayLiteral::new(); columns], ctids: Default::default() }
    }

    /// The group of `shard` among `groups`, added when it is not there yet.
    fn of_shard(groups: &mut Vec<ResultGroup>, shard: i64, columns: usize) -> &mut ResultGroup {
        let index = match groups.iter().position(|g| g.shard == shard) {
            Some(index) => index,
            None => {
                groups.push(ResultGroup::new(shard, columns));
                groups.len() - 1
            }
        };
        &mut groups[index]
    }
}

/// Plans and runs a statement here (a Query tree, nodeToString), with the statement's
/// parameters and snapshot, and puts the rows it returns (at most `row_limit`, 0: all) into
/// `store`; returns their descriptor. `identified_target`: see `Broadcast::target_rows`.
unsafe fn run_query(
    node: *mut pg_sys::CustomScanState,
    query: &str,
    identified_target: u32,
    row_limit: u64,
    store: *mut pg_sys::Tuplestorestate,
) -> Result<pg_sys::TupleDesc> {
    #[repr(C)]
    struct StoreReceiver {
        base: pg_sys::DestReceiver,
        store: *mut pg_sys::Tuplestorestate,
    }
    #[pg_guard]
    unsafe extern "C-unwind" fn receive(slot: *mut pg_sys::TupleTableSlot, receiver: *mut pg_sys::DestReceiver) -> bool {
        pg_sys::tuplestore_puttupleslot((*receiver.cast::<StoreReceiver>()).store, slot);
        true
    }
    // Nothing to do at the start and the end: the store is the caller's.
    unsafe extern "C-unwind" fn startup(_receiver: *mut pg_sys::DestReceiver, _operation: i32, _tupdesc: pg_sys::TupleDesc) {}
    unsafe extern "C-unwind" fn nothing(_receiver: *mut pg_sys::DestReceiver) {}

    let estate = (*node).ss.ps.state;
    let params = (*estate).es_param_list_info;
    let (subquery, reissued) = crate::planner::aggregates::restore_query(query)?;
    let source = if (*estate).es_sourceText.is_null() { c"".as_ptr() } else { (*estate).es_sourceText };
    let planned = if identified_target != 0 {
        // PostgreSQL's plan over ShardScans, never one sent whole to the shards: the target's
        // scan reads the identity of its rows.
        let _identified = crate::planner::scan_path::IdentifiedTarget::set(identified_target);
        pg_sys::standard_planner(subquery, source, 0, params)
    } else {
        pg_sys::pg_plan_query(subquery, source, 0, params)
    };
    drop(reissued);
    let mut receiver = StoreReceiver {
        base: pg_sys::DestReceiver {
            receiveSlot: Some(receive),
            rStartup: Some(startup),
            rShutdown: Some(nothing),
            rDestroy: Some(nothing),
            mydest: pg_sys::CommandDest::DestTuplestore,
        },
        store,
    };
    let description = pg_sys::CreateQueryDesc(
        planned,
        source,
        pg_sys::GetActiveSnapshot(),
        std::ptr::null_mut(),
        &mut receiver.base,
        params,
        std::ptr::null_mut(),
        0,
    );
    pg_sys::ExecutorStart(description, 0);
    pg_sys::ExecutorRun(description, pg_sys::ScanDirection::ForwardScanDirection, row_limit, true);
    pg_sys::ExecutorFinish(description);
    let tupdesc = pg_sys::CreateTupleDescCopy((*description).tupDesc);
    pg_sys::ExecutorEnd(description);
    pg_sys::FreeQueryDesc(description);

    Ok(tupdesc)
}

/// The largest intermediate result sent to the tasks, in bytes of text over all its columns
/// (a parameter value cannot reach 1 GB).
const INTERMEDIATE_RESULT_LIMIT: usize = 512 * 1024 * 1024;

/// Runs an intermediate result's subquery here, with the statement's parameters and snapshot,
/// and returns its rows as text arrays (one per column, values in the workers' text form): one
/// group, or with `route`, a group per shard of that table, by the value of the second column
/// (a row's distribution value, see planner/chosen_rows.rs). The rows are stored first and
/// turned into text afterwards, under the settings the workers read text with, so that the
/// subquery itself runs under the session's.
unsafe fn intermediate_result(
    node: *mut pg_sys::CustomScanState,
    broadcast: &Broadcast,
    query: &str,
    route: Option<&DistributedTable>,
) -> Result<Vec<ResultGroup>> {
    let store = pg_sys::tuplestore_begin_heap(false, false, *std::ptr::addr_of!(pg_sys::work_mem));
    let tupdesc = run_query(node, query, broadcast.target_rows, broadcast.row_limit, store)?;
    let natts = (*tupdesc).natts as usize;
    let columns = broadcast.columns;
    if !broadcast.exists && natts < columns {
        return Err(ShardingError::internal(format!("an intermediate result has {natts} columns, expected {columns}")));
    }
    // Rows to change carry their distribution value second (after the ctid); routed rows
    // carry it in their route column.
    let key = if broadcast.target_rows != 0 { 1 } else { broadcast.route_column.unwrap_or(0) };
    let route = match route {
        Some(table) if natts > key => {
            let type_oid = (*(*tupdesc).attrs.as_ptr().add(key)).atttypid;
            let kind = crate::routing::DistKind::of_type(type_oid)
                .ok_or_else(|| ShardingError::internal("the rows to route lack their distribution value"))?;
            let kind = crate::routing::DistKind::hashing(table.distribution_kind, kind);
            Some((table, kind))
        }
        Some(_) => return Err(ShardingError::internal("the rows to route lack their distribution value")),
        None => None,
    };
    let mut groups = vec![ResultGroup::new(0, columns)];
    if route.is_some() {
        groups.clear();
    }
    let mut text = TextColumns::new(tupdesc, if broadcast.exists { 0 } else { columns });
    let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
    let _settings = TransmissionSettings::enter();
    while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
        if broadcast.exists {
            groups[0].rows += 1;
            groups[0].arrays[0].push(Some(b"1"));
            continue;
        }
        pg_sys::slot_getallattrs(slot);
        let group = match route {
            None => &mut groups[0],
            Some((table, kind)) => {
                let value = (!*(*slot).tts_isnull.add(key)).then(|| *(*slot).tts_values.add(key));
                if value.is_none() && broadcast.target_rows == 0 {
                    let fails = broadcast.null_key_fails
                        && natts > columns
                        && !*(*slot).tts_isnull.add(columns)
                        && (*(*slot).tts_values.add(columns)).value() != 0;
                    if !fails {
                        // Matches nothing anywhere, and nothing inserts it.
                        continue;
                    }
                }
                ResultGroup::of_shard(&mut groups, crate::routing::shard_for_value(table, value, kind)?, columns)
            }
        };
        if broadcast.target_rows != 0 {
            // The same row version, found through several join partners: changed once, with
            // the values of the first (PostgreSQL takes one of them too).
            if *(*slot).tts_isnull {
                return Err(ShardingError::internal("a row to change came without its ctid"));
            }
            let tid = &*(*(*slot).tts_values).cast_mut_ptr::<pg_sys::ItemPointerData>();
            let block = (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo);
            if !group.ctids.insert((block, tid.ip_posid)) {
                continue;
            }
        }
        group.rows += 1;
        text.push(slot, &mut group.arrays);
        if text.bytes > INTERMEDIATE_RESULT_LIMIT {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("the intermediate result of a subquery exceeds {} MB", INTERMEDIATE_RESULT_LIMIT / (1024 * 1024)),
            )
            .detail(format!("Subquery: {}", broadcast.table))
            .hint("Filter the subquery further, or join its tables on their distribution columns."));
        }
    }
    pg_sys::ExecDropSingleTupleTableSlot(slot);
    pg_sys::tuplestore_end(store);
    Ok(groups)
}

extern "C-unwind" {
    /// ExecScan over `pg_sharding_shard_scan_next`, in C (src/hooks_c/hooks.c) so that an
    /// ERROR from a task reaches PostgreSQL once, with its detail and context intact.
    fn pg_sharding_shard_scan_exec(node: *mut pg_sys::CustomScanState) -> *mut pg_sys::TupleTableSlot;
}

/// Rows that come back as text (some column is of a type the workers' binary form would not
/// name the same way) are printed on the workers with the session's settings: refused when
/// those do not print a column's values exactly (a time zone abbreviation like IST names other
/// zones too; floats rounded by extra_float_digits), where the coordinator would read other values.
pub(crate) unsafe fn text_values_exact(tupdesc: pg_sys::TupleDesc) -> Result<()> {
    for i in 0..(*tupdesc).natts as usize {
        let attr = (*tupdesc).attrs.as_ptr().add(i);
        let base = pg_sys::getBaseType((*attr).atttypid);
        let element = pg_sys::get_element_type(base);
        let value_type = if element == pg_sys::InvalidOid { base } else { pg_sys::getBaseType(element) };
        let setting = if value_type == pg_sys::TIMESTAMPTZOID && pg_sys::DateStyle != pg_sys::USE_ISO_DATES as i32 {
            "DateStyle"
        } else if (value_type == pg_sys::FLOAT4OID || value_type == pg_sys::FLOAT8OID) && pg_sys::extra_float_digits <= 0 {
            "extra_float_digits"
        } else {
            continue;
        };
        let type_name = std::ffi::CStr::from_ptr(pg_sys::format_type_be(value_type)).to_string_lossy();
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{type_name} values would be read from the shards as text, which the current {setting} does not print exactly"),
        )
        .detail("Rows with columns of arrays of enums or domains come back from the workers as text.")
        .hint("SET DateStyle = 'ISO' (for timestamptz) or extra_float_digits = 1 (for floats), or select the user-defined columns as text (col::text)."));
    }
    Ok(())
}

/// The next row of the scan (filling it from the tasks on the first call); an empty slot at
/// the end. Called by ExecScan, which applies the scan's quals and projection.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_shard_scan_next(scan_state: *mut pg_sys::ScanState) -> *mut pg_sys::TupleTableSlot {
    let state = scan_state as *mut ShardScanState;
    let runtime = &mut *(*state).runtime;
    if !runtime.filled {
        if runtime.stream.is_none() && streams(runtime) && !start_stream(scan_state.cast(), runtime).or_raise() {
            runtime.may_stream = false;
        }
        if runtime.stream.is_some() {
            return next_streamed(scan_state.cast(), runtime).or_raise();
        }
        fill(scan_state.cast(), runtime).or_raise();
    }
    let slot = (*scan_state).ss_ScanTupleSlot;
    let forward = (*(*scan_state).ps.state).es_direction != pg_sys::ScanDirection::BackwardScanDirection;
    if pg_sys::tuplestore_gettupleslot(runtime.store, forward, false, runtime.store_slot) {
        if runtime.count_returned {
            (*(*scan_state).ps.state).es_processed += 1;
        }
        pg_sys::ExecCopySlot(slot, runtime.store_slot)
    } else {
        pg_sys::ExecClearTuple(slot)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn end(node: *mut pg_sys::CustomScanState) {
    let state = node as *mut ShardScanState;
    if !(*node).custom_ps.is_null() {
        pg_sys::ExecEndNode((*(*(*node).custom_ps).elements).ptr_value as *mut pg_sys::PlanState);
    }
    if !(*state).runtime.is_null() {
        let runtime = &mut *(*state).runtime;
        // Rows no longer wanted (a LIMIT above, a cursor closed early): the tasks stop.
        if let Some(mut run) = runtime.stream.take() {
            run.stop();
        }
        runtime.streamed_tables = None;
        pg_sys::tuplestore_end(runtime.store);
        pg_sys::ExecDropSingleTupleTableSlot(runtime.store_slot);
        pg_sys::MemoryContextDelete(runtime.row_context);
        drop(Box::from_raw((*state).runtime));
        (*state).runtime = std::ptr::null_mut();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn rescan(node: *mut pg_sys::CustomScanState) {
    let state = node as *mut ShardScanState;
    if (*state).runtime.is_null() {
        return;
    }
    let runtime = &mut *(*state).runtime;
    if runtime.streamed {
        // Streamed rows were not kept: the tasks run again, this time into the tuplestore.
        if let Some(mut run) = runtime.stream.take() {
            run.stop();
        }
        runtime.streamed_tables = None;
        runtime.streamed = false;
        runtime.may_stream = false;
        runtime.filled = false;
        pg_sys::tuplestore_clear(runtime.store);
    } else if runtime.filled {
        pg_sys::tuplestore_rescan(runtime.store);
    }
}

/// The worker's EXPLAIN of a task, one line per plan line.
fn remote_plan(task: &Task, params: &[TaskParam]) -> Result<String> {
    let sql = format!("EXPLAIN {}", task.sql.to_string_lossy());
    let explain = Task {
        node: task.node.clone(),
        sql: CString::new(sql).map_err(|e| ShardingError::internal(e.to_string()))?,
        params: None,
        run_as: task.run_as,
    };
    let params = task.params.as_deref().unwrap_or(params).to_vec();
    let mut lines = Vec::new();
    tasks::run(std::slice::from_ref(&explain), &params, false, remote::read_access(), |row| {
        if let Some(line) = row.value(0) {
            lines.push(String::from_utf8_lossy(line).into_owned());
        }
        Ok(())
    })?;
    Ok(lines.join("\n"))
}

#[pg_guard]
unsafe extern "C-unwind" fn explain(node: *mut pg_sys::CustomScanState, _ancestors: *mut pg_sys::List, es: *mut pg_sys::ExplainState) {
    let state = node as *mut ShardScanState;
    if (*state).runtime.is_null() {
        return;
    }
    let runtime = &*(*state).runtime;
    if runtime.plan.statement.is_some() {
        // A data-modifying WITH query, run first as a statement of its own.
        let sql = CString::new(runtime.plan.statement_sql.as_str()).unwrap_or_default();
        pg_sys::ExplainPropertyText(c"Statement Run First".as_ptr(), sql.as_ptr(), es);
        if let Some(elapsed) = runtime.elapsed {
            pg_sys::ExplainPropertyFloat(c"Statement Execution Time".as_ptr(), c"ms".as_ptr(), elapsed.as_secs_f64() * 1000.0, 3, es);
        }
        return;
    }
    let count = runtime.tasks.len();
    pg_sys::ExplainPropertyInteger(c"Task Count".as_ptr(), std::ptr::null(), count as i64, es);
    let all = crate::guc::EXPLAIN_ALL_TASKS.get();
    let shown = if all { count } else { count.min(1) };
    let label = if all { "All".to_string() } else { format!("One of {count}") };
    let label = CString::new(label).unwrap_or_default();
    pg_sys::ExplainPropertyText(c"Tasks Shown".as_ptr(), label.as_ptr(), es);
    let mut shards: Vec<String> = runtime.task_shards.iter().map(|s| s.to_string()).collect();
    shards.dedup();
    let shards = if shards.len() > 4 {
        format!("{} shards: {}, {}, ..., {}", shards.len(), shards[0], shards[1], shards[shards.len() - 1])
    } else {
        shards.join(", ")
    };
    let shards = CString::new(shards).unwrap_or_default();
    pg_sys::ExplainPropertyText(c"Shards".as_ptr(), shards.as_ptr(), es);
    let mut nodes: Vec<String> = runtime.tasks.iter().map(|t| format!("{}:{}", t.node.host, t.node.port)).collect();
    nodes.sort();
    nodes.dedup();
    let nodes = CString::new(nodes.join(", ")).unwrap_or_default();
    pg_sys::ExplainPropertyText(c"Nodes".as_ptr(), nodes.as_ptr(), es);
    // Tables read through a view of another role's (see connection::run_as).
    if runtime.plan.run_as != 0 && pg_sys::Oid::from(runtime.plan.run_as) != pg_sys::GetUserId() {
        let role = pg_sys::GetUserNameFromId(pg_sys::Oid::from(runtime.plan.run_as), true);
        if !role.is_null() {
            pg_sys::ExplainPropertyText(c"Runs As".as_ptr(), role, es);
        }
    }
    if let Some(elapsed) = runtime.elapsed {
        pg_sys::ExplainPropertyFloat(c"Remote Execution Time".as_ptr(), c"ms".as_ptr(), elapsed.as_secs_f64() * 1000.0, 3, es);
    }
    // Tables sent to every task: which, how they are read, and with ANALYZE how many rows.
    for (i, broadcast) in runtime.plan.broadcasts.iter().enumerate() {
        let table = CString::new(broadcast.table.as_str()).unwrap_or_default();
        if broadcast.query.is_some() {
            // A subquery run here first (with ANALYZE: how many of its rows went out).
            pg_sys::ExplainPropertyText(c"Intermediate Result".as_ptr(), table.as_ptr(), es);
            if let Some(&rows) = runtime.broadcast_rows.get(i) {
                pg_sys::ExplainPropertyInteger(c"Intermediate Result Rows".as_ptr(), std::ptr::null(), rows as i64, es);
            }
            continue;
        }
        pg_sys::ExplainPropertyText(c"Broadcast".as_ptr(), table.as_ptr(), es);
        if let Some(&rows) = runtime.broadcast_rows.get(i) {
            pg_sys::ExplainPropertyInteger(c"Broadcast Rows".as_ptr(), std::ptr::null(), rows as i64, es);
        }
        let (tasks, _) = plan_tasks(node, &broadcast.plan, runtime.role).or_raise();
        pg_sys::ExplainPropertyInteger(c"Broadcast Task Count".as_ptr(), std::ptr::null(), tasks.len() as i64, es);
        if let Some(task) = tasks.first() {
            pg_sys::ExplainPropertyText(c"Broadcast SQL".as_ptr(), task.sql.as_ptr(), es);
        }
    }
    for task in runtime.tasks.iter().take(shown) {
        let node = CString::new(format!("{}:{}", task.node.host, task.node.port)).unwrap_or_default();
        pg_sys::ExplainPropertyText(c"Task Node".as_ptr(), node.as_ptr(), es);
        pg_sys::ExplainPropertyText(c"Remote SQL".as_ptr(), task.sql.as_ptr(), es);
        // With VERBOSE or ANALYZE, the node's own plan for the task (EXPLAIN without ANALYZE
        // there: the task itself already ran, and must not run twice).
        if (*es).verbose || (*es).analyze {
            let plan = remote_plan(task, &runtime.params).or_raise();
            let plan = CString::new(plan).unwrap_or_default();
            pg_sys::ExplainPropertyText(c"Remote Plan".as_ptr(), plan.as_ptr(), es);
        }
    }
}
