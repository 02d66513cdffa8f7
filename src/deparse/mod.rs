//! SQL text for the workers. Identifiers and literals go through PostgreSQL's own quoting
//! (`quote.rs`); table definitions come from the catalog through ruleutils (`table.rs`).

pub mod merge;
pub mod query;
pub mod quote;
pub mod table;
