//! PostgreSQL's quoting, for every identifier and literal placed in SQL sent to workers.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

/// `quote_identifier`: quotes only when needed, exactly as PostgreSQL prints identifiers.
pub fn ident(name: &str) -> String {
    // Identifiers come from the catalog (no NUL bytes possible); guard anyway.
    let Ok(raw) = CString::new(name) else { return String::from("\"\"") };
    // SAFETY: quote_identifier returns its argument or a palloc'd copy; both are read at once.
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(raw.as_ptr())) }.to_string_lossy().into_owned()
}

/// `schema.name`, each part quoted.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// `quote_literal_cstr`: a string literal, with E'' escaping when it holds backslashes.
pub fn literal(value: &str) -> String {
    let Ok(raw) = CString::new(value) else { return String::from("NULL") };
    // SAFETY: returns a palloc'd NUL-terminated copy, read at once.
    unsafe { CStr::from_ptr(pg_sys::quote_literal_cstr(raw.as_ptr())) }.to_string_lossy().into_owned()
}
