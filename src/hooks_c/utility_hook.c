/*
 * The ProcessUtility hook's entry point, in C on purpose.
 *
 * Most utility statements are not pg_sharding's business. They must run exactly as without
 * the extension, errors included: an ERROR raised by standard_ProcessUtility called through
 * Rust is caught at pgrx's FFI boundary and re-raised without its CONTEXT (COPY would lose its
 * line numbers on every server where pg_sharding is loaded). So this shim asks Rust whether a
 * statement touches a distributed table, and calls the previous or standard hook itself when
 * it does not.
 */
#include "postgres.h"
#include "tcop/utility.h"

/* Rust (src/commands/utility.rs): both are #[pg_guard] functions. */
extern bool pg_sharding_utility_wants(PlannedStmt *pstmt);
extern void pg_sharding_utility_run(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
									ProcessUtilityContext context, ParamListInfo params,
									QueryEnvironment *queryEnv, DestReceiver *dest,
									QueryCompletion *qc);

static ProcessUtility_hook_type previous_process_utility = NULL;

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

void
pg_sharding_install_utility_hook(void)
{
	previous_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = pg_sharding_process_utility;
}
