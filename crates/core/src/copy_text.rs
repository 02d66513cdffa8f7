//! Encoding of values in PostgreSQL's COPY text format (the default format of COPY).
//! A row is fields separated by tabs and ended by a newline; NULL is `\N`; backslash, tab,
//! newline and carriage return inside a value are escaped with a backslash.

pub fn push_null(row: &mut Vec<u8>) {
    row.extend_from_slice(b"\\N");
}

pub fn push_field(row: &mut Vec<u8>, value: &[u8]) {
    for &byte in value {
        match byte {
            b'\\' => row.extend_from_slice(b"\\\\"),
            b'\t' => row.extend_from_slice(b"\\t"),
            b'\n' => row.extend_from_slice(b"\\n"),
            b'\r' => row.extend_from_slice(b"\\r"),
            _ => row.push(byte),
        }
    }
}

/// Appends a whole row: fields (None = NULL) joined by tabs, then a newline.
pub fn push_row<'a>(row: &mut Vec<u8>, fields: impl IntoIterator<Item = Option<&'a [u8]>>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            row.push(b'\t');
        }
        match field {
            Some(value) => push_field(row, value),
            None => push_null(row),
        }
    }
    row.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_copy_text_needs() {
        let mut row = Vec::new();
        push_row(&mut row, [Some(&b"a\tb"[..]), None, Some(b"line1\nline2\r"), Some(b"back\\slash"), Some(b"")]);
        assert_eq!(row, b"a\\tb\t\\N\tline1\\nline2\\r\tback\\\\slash\t\n".to_vec());
    }

    #[test]
    fn a_literal_backslash_n_is_not_null() {
        let mut row = Vec::new();
        push_row(&mut row, [Some(&b"\\N"[..])]);
        assert_eq!(row, b"\\\\N\n".to_vec());
    }
}
