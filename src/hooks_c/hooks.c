/*
 * Entry points of pg_sharding's planner, ProcessUtility and ExecutorRun hooks, in C on purpose.
 *
 * Most statements are not pg_sharding's business and must run exactly as without the
 * extension, errors included. An ERROR raised by PostgreSQL code called through Rust is caught
 * at pgrx's FFI boundary and re-raised without its CONTEXT (COPY line numbers, PL/pgSQL
 * call stacks, ...). So these shims call the previous or standard implementation themselves,
 * and hand over to Rust only the statements that touch distributed tables.
 */
#include "postgres.h"
#include "executor/executor.h"
#include "nodes/execnodes.h"
#include "optimizer/planner.h"
#include "tcop/utility.h"

/* Rust (#[pg_guard] functions): src/commands/utility.rs, src/planner/mod.rs, src/executor/. */
extern bool pg_sharding_utility_wants(PlannedStmt *pstmt);
extern void pg_sharding_utility_run(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
									ProcessUtilityContext context, ParamListInfo params,
									QueryEnvironment *queryEnv, DestReceiver *dest,
									QueryCompletion *qc);
extern PlannedStmt *pg_sharding_plan(Query *parse, const char *query_string, int cursorOptions,
									  ParamListInfo boundParams);
extern void pg_sharding_check_plan(PlannedStmt *planned);
extern void pg_sharding_planner_enter(void);
extern void pg_sharding_planner_leave(void);
extern bool pg_sharding_executor_wants(QueryDesc *queryDesc);
extern void pg_sharding_executor_run(QueryDesc *queryDesc, ScanDirection direction, uint64 count,
									 bool execute_once);

static ProcessUtility_hook_type previous_process_utility = NULL;
static planner_hook_type previous_planner = NULL;
static ExecutorRun_hook_type previous_executor_run = NULL;

void
pg_sharding_standard_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
									 ProcessUtilityContext context, ParamListInfo params,
									 QueryEnvironment *queryEnv, DestReceiver *dest,
									 QueryCompletion *qc)
{
	if (previous_process_utility)
		previous_process_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

static void
pg_sharding_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
							ProcessUtilityContext context, ParamListInfo params,
							QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (pg_sharding_utility_wants(pstmt))
		pg_sharding_utility_run(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		pg_sharding_standard_process_utility(pstmt, queryString, readOnlyTree, context, params,
											 queryEnv, dest, qc);
}

/*
 * The plans of the task_results calls a planning makes (src/planner/aggregates.rs) are valid
 * until the outermost planner call ends, however it ends.
 */
static PlannedStmt *
pg_sharding_planner(Query *parse, const char *query_string, int cursorOptions, ParamListInfo boundParams)
{
	PlannedStmt *planned;

	pg_sharding_planner_enter();
	PG_TRY();
	{
		planned = pg_sharding_plan(parse, query_string, cursorOptions, boundParams);
		if (planned == NULL)
		{
			if (previous_planner)
				planned = previous_planner(parse, query_string, cursorOptions, boundParams);
			else
				planned = standard_planner(parse, query_string, cursorOptions, boundParams);
			pg_sharding_check_plan(planned);
		}
	}
	PG_FINALLY();
	{
		pg_sharding_planner_leave();
	}
	PG_END_TRY();
	return planned;
}

static void
pg_sharding_executor_run_hook(QueryDesc *queryDesc, ScanDirection direction, uint64 count, bool execute_once)
{
	if (pg_sharding_executor_wants(queryDesc))
		pg_sharding_executor_run(queryDesc, direction, count, execute_once);
	else if (previous_executor_run)
		previous_executor_run(queryDesc, direction, count, execute_once);
	else
		standard_ExecutorRun(queryDesc, direction, count, execute_once);
}

/* ShardScan's ExecCustomScan (src/executor/remote_scan.rs). */
extern TupleTableSlot *pg_sharding_shard_scan_next(ScanState *node);

static bool
pg_sharding_shard_scan_recheck(ScanState *node, TupleTableSlot *slot)
{
	return true;
}

TupleTableSlot *
pg_sharding_shard_scan_exec(CustomScanState *node)
{
	return ExecScan(&node->ss, (ExecScanAccessMtd) pg_sharding_shard_scan_next,
					(ExecScanRecheckMtd) pg_sharding_shard_scan_recheck);
}

void
pg_sharding_install_hooks(void)
{
	previous_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = pg_sharding_process_utility;
	previous_planner = planner_hook;
	planner_hook = pg_sharding_planner;
	previous_executor_run = ExecutorRun_hook;
	ExecutorRun_hook = pg_sharding_executor_run_hook;
}
