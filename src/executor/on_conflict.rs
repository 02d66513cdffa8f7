//! INSERT ... ON CONFLICT into a hash-distributed table: the shard decides.
//!
//! Rows are computed on the coordinator as for any INSERT, then sent per shard as
//! `INSERT INTO <shard> AS <name> (<columns>) VALUES ($1, ...), ... ON CONFLICT ... RETURNING ...`
//! with the values as parameters. The ON CONFLICT action, its WHERE and the RETURNING list are
//! deparsed from the planned ModifyTable by PostgreSQL's ruleutils (as EXPLAIN does), so they
//! print `<name>.column` and `excluded.column`, and the shard is given exactly that name. The
//! conflict target comes from the catalog: the shard's copy of the arbiter constraint, or the
//! arbiter index's columns. RETURNING rows come back from the shard (for DO UPDATE they are the
//! updated rows) and are converted with the columns' input functions; with RETURNING, rows
//! travel in input order (runs of consecutive rows of one shard), so the returned rows keep it.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::table_def::shard_object_name;

use crate::catalog::cache;
use crate::catalog::nodes::Node;
use crate::catalog::tables::{DistributedTable, Method};
use crate::commands::utility::list_pointers;
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};
use crate::routing;
use crate::transaction::remote;

/// Rows per statement sent to a shard (and never more than PostgreSQL's 65535 parameters).
const BATCH_ROWS: usize = 1000;

fn unsupported(message: impl Into<String>) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message)
}

unsafe fn cstr(text: *const std::ffi::c_char) -> String {
    CStr::from_ptr(text).to_string_lossy().into_owned()
}

/// The deparsed pieces of the statement every shard gets.
struct ShardStatement {
    alias: String,
    columns: Vec<String>,
    /// "ON CONFLICT ..." (conflict target filled in per shard from `target`).
    target: ConflictTarget,
    action: String,
    returning: Option<String>,
}

enum ConflictTarget {
    None,
    Constraint(String),
    Columns { columns: Vec<String>, predicate: Option<String> },
}

impl ShardStatement {
    fn sql(&self, schema: &str, table: &str, shard_id: i64, rows: usize) -> String {
        let width = self.columns.len();
        let values: Vec<String> = (0..rows)
            .map(|row| {
                let params: Vec<String> = (1..=width).map(|i| format!("${}", row * width + i)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        let target = match &self.target {
            ConflictTarget::None => String::new(),
            ConflictTarget::Constraint(name) => {
                format!(" ON CONSTRAINT {}", quote::ident(&shard_object_name(name, shard_id)))
            }
            ConflictTarget::Columns { columns, predicate } => {
                let list: Vec<String> = columns.iter().map(|c| quote::ident(c)).collect();
                let mut sql = format!(" ({})", list.join(", "));
                if let Some(predicate) = predicate {
                    sql.push_str(&format!(" WHERE {predicate}"));
                }
                sql
            }
        };
        let mut sql = format!(
            "INSERT INTO {} AS {} ({}) VALUES {} ON CONFLICT{target} {}",
            quote::qualified(schema, &shard_object_name(table, shard_id)),
            quote::ident(&self.alias),
            self.columns.iter().map(|c| quote::ident(c)).collect::<Vec<_>>().join(", "),
            values.join(", "),
            self.action,
        );
        if let Some(returning) = &self.returning {
            sql.push_str(&format!(" RETURNING {returning}"));
        }
        sql
    }
}

/// Deparses the ON CONFLICT action and RETURNING of `modify` for the shards.
unsafe fn shard_statement(
    query_desc: *mut pg_sys::QueryDesc,
    modify: *mut pg_sys::ModifyTable,
    table: &DistributedTable,
    relation: pg_sys::Relation,
    columns: Vec<String>,
) -> Result<ShardStatement> {
    let planned = (*query_desc).plannedstmt;
    let rtable = (*planned).rtable;
    let result_index = crate::planner::insert_target(planned).unwrap_or(1);
    let everything = pg_sys::bms_add_range(std::ptr::null_mut(), 1, (*rtable).length);
    let names = pg_sys::select_rtable_names_for_explain(rtable, everything);
    // The shard statement names the proposed row `excluded`, whatever name the plan's entry
    // got (an INSERT through a view has two entries of that name).
    let excluded = usize::try_from((*modify).exclRelRTI).unwrap_or(0);
    if excluded > 0 && !names.is_null() && excluded <= (*names).length as usize {
        for (i, name) in list_pointers::<std::ffi::c_char>(names).into_iter().enumerate() {
            let renamed = if i + 1 == excluded {
                c"excluded".as_ptr()
            } else if !name.is_null() && CStr::from_ptr(name).to_bytes() == b"excluded" {
                c"excluded_rel".as_ptr()
            } else {
                continue;
            };
            (*(*names).elements.add(i)).ptr_value = pg_sys::pstrdup(renamed).cast();
        }
    }
    let context = pg_sys::deparse_context_for_plan_tree(planned, names);
    let context = pg_sys::set_deparse_context_plan(context, modify.cast(), std::ptr::null_mut());
    let deparse = |node: *mut pg_sys::Node| cstr(pg_sys::deparse_expression(node, context, true, false));
    let alias = list_pointers::<std::ffi::c_char>(names)
        .get(result_index - 1)
        .filter(|name| !name.is_null())
        .map(|name| cstr(*name))
        .unwrap_or_else(|| table.name.clone());

    // The statement's parameters, now() and the like: the coordinator's values (hoist.rs); the
    // target's tableoid: the table's. What is left must mean the same on the shard.
    let estate = (*query_desc).estate;
    let here = |node: *mut pg_sys::Node| crate::planner::hoist::computed_here(node, estate, (result_index as i32, table.relid));
    let set_list = here((*modify).onConflictSet.cast()).cast::<pg_sys::List>();
    let condition = here((*modify).onConflictWhere);
    let returning_lists = here((*modify).returningLists.cast()).cast::<pg_sys::List>();
    // An object identifier returned as such (`RETURNING tableoid::regclass`, now a constant)
    // travels as its number, which the coordinator reads with the type's input function.
    for list in list_pointers::<pg_sys::List>(returning_lists) {
        for entry in list_pointers::<pg_sys::TargetEntry>(list) {
            let value = (*entry).expr.cast::<pg_sys::Const>();
            if (*value).xpr.type_ == pg_sys::NodeTag::T_Const && crate::planner::shippable::names_local_object((*value).consttype) {
                let number = pg_sys::Datum::from(i64::from((*value).constvalue.value() as u32));
                (*entry).expr = pg_sys::makeConst(pg_sys::INT8OID, -1, pg_sys::InvalidOid, 8, number, (*value).constisnull, true).cast();
            }
        }
    }
    check_shard_expressions(&[set_list.cast(), condition, returning_lists.cast()], table)?;
    let action = match (*modify).onConflictAction {
        pg_sys::OnConflictAction::ONCONFLICT_NOTHING => "DO NOTHING".to_string(),
        _ => {
            let descriptor = (*relation).rd_att;
            let mut assignments = Vec::new();
            // Since PostgreSQL 14 an entry's resno is its position in the list; the column it
            // assigns is the matching element of onConflictCols.
            let targets: Vec<usize> =
                crate::commands::utility::int_list((*modify).onConflictCols).into_iter().map(|a| a as usize).collect();
            let entries = list_pointers::<pg_sys::TargetEntry>(set_list);
            if entries.len() != targets.len() {
                return Err(ShardingError::internal("ON CONFLICT SET list and its target columns differ in length"));
            }
            for (entry, attnum) in entries.into_iter().zip(targets) {
                if (*entry).resjunk {
                    continue;
                }
                let attribute = (*descriptor).attrs.as_ptr().add(attnum - 1);
                if (*attribute).attisdropped || (*attribute).attgenerated != 0 {
                    continue;
                }
                let name = cstr((*attribute).attname.data.as_ptr());
                assignments.push(format!("{} = {}", quote::ident(&name), deparse((*entry).expr.cast())));
            }
            if assignments.is_empty() {
                // Only generated columns were assigned (SET g = DEFAULT): the shard recomputes
                // them when it updates the row, which an assignment of a column to itself makes it do.
                let column = columns.first().ok_or_else(|| ShardingError::internal("a table without stored columns"))?;
                assignments.push(format!("{} = {}.{}", quote::ident(column), quote::ident(&alias), quote::ident(column)));
            }
            let mut action = format!("DO UPDATE SET {}", assignments.join(", "));
            if !condition.is_null() {
                let condition = pg_sys::make_ands_explicit(condition.cast());
                action.push_str(&format!(" WHERE {}", deparse(condition.cast())));
            }
            action
        }
    };

    let returning = if (*planned).hasReturning {
        let lists = list_pointers::<pg_sys::List>(returning_lists);
        let entries = list_pointers::<pg_sys::TargetEntry>(lists.first().copied().unwrap_or(std::ptr::null_mut()));
        Some(entries.iter().map(|e| deparse((**e).expr.cast())).collect::<Vec<_>>().join(", "))
    } else {
        None
    };

    Ok(ShardStatement { alias, columns, target: conflict_target(modify, table)?, action, returning })
}

/// Refuses what the shard statement cannot say (in `lists`, the clauses as computed_here left
/// them): subqueries (executor parameters of the coordinator's plan), assignments to an element
/// or field of a column, system columns (a shard's ctid is not the table's; the target's
/// tableoid was replaced) and values naming local objects (`tableoid::regclass` among them).
unsafe fn check_shard_expressions(lists: &[*mut pg_sys::Node], table: &DistributedTable) -> Result<()> {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, found: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        use pg_sys::NodeTag::*;
        let problem = match (*node).type_ {
            T_SubPlan | T_AlternativeSubPlan => Some("subqueries"),
            T_Param if (*node.cast::<pg_sys::Param>()).paramkind != pg_sys::ParamKind::PARAM_EXTERN => Some("subqueries"),
            T_SubscriptingRef if !(*node.cast::<pg_sys::SubscriptingRef>()).refassgnexpr.is_null() => {
                Some("assignments to an element of a column")
            }
            T_FieldStore => Some("assignments to a field of a column"),
            // An identity column's DEFAULT: the sequence is the coordinator's.
            T_NextValueExpr => Some("identity column defaults"),
            T_Var if (*node.cast::<pg_sys::Var>()).varattno < 0 => Some("system columns"),
            T_Const => {
                let type_oid = (*node.cast::<pg_sys::Const>()).consttype;
                crate::planner::shippable::names_local_object(type_oid).then_some("object identifiers")
            }
            _ => None,
        };
        if let Some(problem) = problem {
            *found.cast::<Option<&'static str>>() = Some(problem);
            return true;
        }
        pg_sys::expression_tree_walker(node, Some(walker), found)
    }
    let mut found: Option<&'static str> = None;
    let context = (&mut found as *mut Option<&'static str>).cast();
    for &list in lists {
        if !list.is_null() && walker(list, context) {
            break;
        }
    }
    match found {
        None => Ok(()),
        Some(problem) => Err(unsupported(format!(
            "{problem} in the DO UPDATE or RETURNING clauses of INSERT ... ON CONFLICT into distributed table \"{}\" are not supported yet",
            table.name
        ))
        .hint("Insert without ON CONFLICT and UPDATE separately, or compute the value in the inserted rows.")),
    }
}

/// The conflict target on the shards, from the arbiter index(es) PostgreSQL inferred.
unsafe fn conflict_target(modify: *mut pg_sys::ModifyTable, table: &DistributedTable) -> Result<ConflictTarget> {
    let arbiters: Vec<pg_sys::Oid> = {
        let list = (*modify).arbiterIndexes;
        if list.is_null() {
            Vec::new()
        } else {
            (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect()
        }
    };
    let Some(first) = arbiters.first() else { return Ok(ConflictTarget::None) };
    let definition = table_ddl::read(table.relid)?;
    let index_name = cstr(pg_sys::get_rel_name(*first));
    if let Some(constraint) = definition.constraints.iter().find(|c| c.name == index_name && matches!(c.kind, 'p' | 'u')) {
        if arbiters.len() == 1 {
            return Ok(ConflictTarget::Constraint(constraint.name.clone()));
        }
        return Ok(ConflictTarget::Columns { columns: column_names(&definition, &constraint.columns)?, predicate: None });
    }
    let index = definition
        .indexes
        .iter()
        .find(|i| i.name == index_name)
        .ok_or_else(|| ShardingError::internal(format!("arbiter index {index_name} is not in the table definition")))?;
    let keys = &index.columns[..index.key_count.min(index.columns.len())];
    if keys.contains(&0) {
        return Err(unsupported(format!("ON CONFLICT on the expression index \"{index_name}\" is not supported yet")));
    }
    Ok(ConflictTarget::Columns { columns: column_names(&definition, keys)?, predicate: index.predicate.clone() })
}

/// Positions in `columns` (the sent columns) of the attributes `attnums`.
fn positions_of(columns: &[(usize, String, pg_sys::FmgrInfo)], attnums: &[i16]) -> Vec<usize> {
    attnums
        .iter()
        .filter_map(|attnum| columns.iter().position(|(index, _, _)| *index as i16 == attnum - 1))
        .collect()
}

fn column_names(definition: &table_ddl::TableDefinition, attnums: &[i16]) -> Result<Vec<String>> {
    attnums
        .iter()
        .map(|attnum| {
            definition
                .columns
                .iter()
                .find(|c| c.attnum == *attnum)
                .map(|c| c.name.clone())
                .ok_or_else(|| ShardingError::internal(format!("no column {attnum}")))
        })
        .collect()
}

/// Output slot for RETURNING rows received as text.
struct Returning {
    slot: *mut pg_sys::TupleTableSlot,
    /// Holds one returned row's values; reset for every row.
    memory: pg_sys::MemoryContext,
    inputs: Vec<(pg_sys::FmgrInfo, pg_sys::Oid, i32)>,
    dest: *mut pg_sys::DestReceiver,
}

impl Returning {
    unsafe fn new(query_desc: *mut pg_sys::QueryDesc) -> Returning {
        let descriptor = (*query_desc).tupDesc;
        let mut inputs = Vec::new();
        for index in 0..(*descriptor).natts as usize {
            let attribute = (*descriptor).attrs.as_ptr().add(index);
            let (mut input_oid, mut io_param) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo((*attribute).atttypid, &mut input_oid, &mut io_param);
            let mut input = std::mem::zeroed::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info(input_oid, &mut input);
            inputs.push((input, io_param, (*attribute).atttypmod));
        }
        let slot = pg_sys::MakeSingleTupleTableSlot(descriptor, &pg_sys::TTSOpsVirtual);
        let memory = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"pg_sharding RETURNING row".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        Returning { slot, inputs, dest: (*query_desc).dest, memory }
    }

    unsafe fn send(&mut self, rows: &crate::connection::RemoteRows) -> Result<()> {
        for row in &rows.rows {
            pg_sys::ExecClearTuple(self.slot);
            pg_sys::MemoryContextReset(self.memory);
            let previous = pg_sys::MemoryContextSwitchTo(self.memory);
            for (index, (input, io_param, typmod)) in self.inputs.iter_mut().enumerate() {
                let value = row.get(index).cloned().flatten();
                let text = match value.map(CString::new).transpose() {
                    Ok(text) => text,
                    Err(_) => {
                        pg_sys::MemoryContextSwitchTo(previous);
                        return Err(ShardingError::internal("NUL in a returned value"));
                    }
                };
                let pointer = text.as_ref().map_or(std::ptr::null_mut(), |t| t.as_ptr().cast_mut());
                *(*self.slot).tts_values.add(index) = pg_sys::InputFunctionCall(input, pointer, *io_param, *typmod);
                *(*self.slot).tts_isnull.add(index) = text.is_none();
            }
            pg_sys::MemoryContextSwitchTo(previous);
            pg_sys::ExecStoreVirtualTuple(self.slot);
            if let Some(receive) = (*self.dest).receiveSlot {
                let (slot, dest) = (self.slot, self.dest);
                pg_sys::ffi::pg_guard_ffi_boundary(|| receive(slot, dest));
            }
        }
        Ok(())
    }
}

struct Pending {
    node: Node,
    rows: Vec<Vec<Option<String>>>,
}

/// Runs an INSERT ... ON CONFLICT whose ModifyTable is `modify`; returns the rows affected.
/// `run_as`: the role whose rights the rows are written with (a view's owner's), 0: the current
/// role's.
pub unsafe fn run(query_desc: *mut pg_sys::QueryDesc, table: &DistributedTable, run_as: u32) -> Result<u64> {
    if table.method == Method::Reference {
        return Err(unsupported(format!(
            "INSERT ... ON CONFLICT into reference table \"{}\" is not supported yet",
            table.name
        )));
    }
    let planned = (*query_desc).plannedstmt;
    let modify = (*planned).planTree.cast::<pg_sys::ModifyTable>();
    let estate = (*query_desc).estate;
    let state = (*query_desc).planstate.cast::<pg_sys::ModifyTableState>();
    let subplan = (*state).ps.lefttree;
    let result = (*state).resultRelInfo;
    let relation = (*result).ri_RelationDesc;
    let natts = (*(*relation).rd_att).natts as usize;
    // The shard decides between inserting and updating, and has no policies or views: only a
    // proposed row's INSERT policies can be checked here, before it is sent.
    let kinds = super::check_option_kinds(result);
    let update = (*modify).onConflictAction == pg_sys::OnConflictAction::ONCONFLICT_UPDATE;
    let checked_here = 1 << pg_sys::WCOKind::WCO_RLS_INSERT_CHECK;
    if kinds & !checked_here != 0 || (update && kinds != 0) {
        return Err(unsupported(format!(
            "INSERT ... ON CONFLICT into distributed table \"{}\" under row-level security or through a view WITH CHECK OPTION is not supported yet",
            table.name
        ))
        .hint("Insert without ON CONFLICT, or into the table itself."));
    }

    // Columns sent: all stored ones, with their output functions.
    let mut columns: Vec<(usize, String, pg_sys::FmgrInfo)> = Vec::new();
    for index in 0..natts {
        let attribute = (*(*relation).rd_att).attrs.as_ptr().add(index);
        if (*attribute).attisdropped || (*attribute).attgenerated != 0 {
            continue;
        }
        let (mut output_oid, mut is_varlena) = (pg_sys::InvalidOid, false);
        pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut output_oid, &mut is_varlena);
        let mut output = std::mem::zeroed::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info(output_oid, &mut output);
        columns.push((index, cstr((*attribute).attname.data.as_ptr()), output));
    }
    let statement = shard_statement(query_desc, modify, table, relation, columns.iter().map(|c| c.1.clone()).collect())?;
    // PostgreSQL refuses a DO UPDATE that would touch one row twice. Within one statement sent
    // to a shard the shard does the same; across batches the coordinator must, so it keeps a
    // fingerprint of each row's conflict key (16 bytes a row) and raises the same error.
    let duplicate_check: Option<Vec<usize>> = match (&statement.target, (*modify).onConflictAction) {
        (_, pg_sys::OnConflictAction::ONCONFLICT_NOTHING) => None,
        (ConflictTarget::Constraint(name), _) => {
            let definition = table_ddl::read(table.relid)?;
            let attnums = definition.constraints.iter().find(|c| &c.name == name).map(|c| c.columns.clone()).unwrap_or_default();
            Some(positions_of(&columns, &attnums))
        }
        (ConflictTarget::Columns { columns: names, predicate: None }, _) => {
            Some(names.iter().filter_map(|n| columns.iter().position(|c| &c.1 == n)).collect())
        }
        // A partial index only conflicts for rows its predicate accepts: the shard decides.
        _ => None,
    };
    let mut seen_keys: std::collections::HashSet<u128> = std::collections::HashSet::new();
    let batch_rows = BATCH_ROWS.min(65535 / columns.len().max(1));
    let (distribution_index, kind) = match (table.distribution_attnum, table.distribution_kind) {
        (Some(attnum), Some(kind)) => ((attnum - 1) as usize, kind),
        _ => return Err(ShardingError::internal("hash table without a distribution column")),
    };
    let nodes = cache::nodes()?;
    let definition = table_ddl::read(table.relid)?;

    let returning = (*planned).hasReturning;
    if returning {
        // RETURNING rows come back as text.
        super::remote_scan::text_values_exact((*query_desc).tupDesc)?;
    }
    let mut output = if returning { Some(Returning::new(query_desc)) } else { None };
    if let Some(output) = &output {
        if let Some(startup) = (*output.dest).rStartup {
            let dest = output.dest;
            pg_sys::ffi::pg_guard_ffi_boundary(|| startup(dest, pg_sys::CmdType::CMD_INSERT as i32, (*query_desc).tupDesc));
        }
    }

    let mut pending: BTreeMap<i64, Pending> = BTreeMap::new();
    let mut affected: u64 = 0;
    let context = pg_sys::MakePerTupleExprContext(estate);
    let flush = |shard_id: i64, batch: Pending, output: &mut Option<Returning>| -> Result<u64> {
        let sql = statement.sql(&definition.schema, &definition.name, shard_id, batch.rows.len());
        let params: Vec<Option<&str>> = batch.rows.iter().flat_map(|r| r.iter().map(|v| v.as_deref())).collect();
        let connection = {
            let _role = crate::connection::run_as(run_as);
            remote::in_transaction(&batch.node)?
        };
        let result = connection.query_counted(&sql, &params).map_err(|e| remote::remote_error(&batch.node, e))?;
        if let Some(output) = output.as_mut() {
            output.send(&result.0)?;
        }
        Ok(result.1)
    };
    let mut rows = super::InsertRows::new(subplan, (*query_desc).plannedstmt);
    while let Some((slot, values, nulls)) = rows.next(context, natts)? {
        super::check_new_row(result, slot, estate);
        let previous = pg_sys::MemoryContextSwitchTo((*context).ecxt_per_tuple_memory);
        let shard_id = routing::shard_for_value(
            table,
            (!nulls[distribution_index]).then(|| values[distribution_index]),
            kind,
        );
        let printing = crate::deparse::query::ValueOutput::enter();
        let row: Vec<Option<String>> = columns
            .iter_mut()
            .map(|(index, _, output)| {
                (!nulls[*index]).then(|| cstr(pg_sys::OutputFunctionCall(output, values[*index])))
            })
            .collect();
        drop(printing);
        pg_sys::MemoryContextSwitchTo(previous);
        let shard_id = shard_id?;
        let shard = table
            .shards
            .iter()
            .find(|s| s.shard_id == shard_id)
            .ok_or_else(|| ShardingError::internal(format!("no shard {shard_id}")))?;
        let node_id = *shard.placements.first().ok_or_else(|| ShardingError::internal("shard without placement"))?;
        let node = nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .cloned()
            .ok_or_else(|| ShardingError::internal(format!("unknown node {node_id}")))?;
        // RETURNING rows must come back in input order (clients match them to their rows by
        // position): then only consecutive rows of one shard travel together.
        if output.is_some() && pending.keys().any(|id| *id != shard.shard_id) {
            for (shard_id, batch) in std::mem::take(&mut pending) {
                affected += flush(shard_id, batch, &mut output)?;
            }
        }
        if let Some(positions) = &duplicate_check {
            let parts: Option<Vec<&[u8]>> = positions.iter().map(|p| row[*p].as_deref().map(str::as_bytes)).collect();
            // A NULL in the key never conflicts.
            if let Some(parts) = parts {
                if !seen_keys.insert(sharding_core::hash::key_fingerprint(parts)) {
                    return Err(ShardingError::new(
                        PgSqlErrorCode::ERRCODE_CARDINALITY_VIOLATION,
                        "ON CONFLICT DO UPDATE command cannot affect row a second time",
                    )
                    .hint("Ensure that no rows proposed for insertion within the same command have duplicate constrained values."));
                }
            }
        }
        let entry = pending.entry(shard.shard_id).or_insert_with(|| Pending { node, rows: Vec::new() });
        entry.rows.push(row);
        if entry.rows.len() >= batch_rows {
            let batch = pending.remove(&shard.shard_id).expect("just filled");
            affected += flush(shard.shard_id, batch, &mut output)?;
        }
    }
    for (shard_id, batch) in std::mem::take(&mut pending) {
        affected += flush(shard_id, batch, &mut output)?;
    }
    if let Some(output) = output {
        if let Some(shutdown) = (*output.dest).rShutdown {
            let dest = output.dest;
            pg_sys::ffi::pg_guard_ffi_boundary(|| shutdown(dest));
        }
        pg_sys::ExecDropSingleTupleTableSlot(output.slot);
        pg_sys::MemoryContextDelete(output.memory);
    }
    Ok(affected)
}
