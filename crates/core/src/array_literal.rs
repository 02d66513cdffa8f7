//! PostgreSQL array literals (`{"a","b",NULL}`) built from values in their text form: how a
//! broadcast join sends the rows of one table to every task, one array per column, for the
//! worker to read back with the column type's own input function (`($1)::integer[]`).

/// A one-dimensional array literal, element by element.
#[derive(Debug, Clone, Default)]
pub struct ArrayLiteral {
    text: Vec<u8>,
    elements: usize,
}

impl ArrayLiteral {
    pub fn new() -> Self {
        Self { text: b"{".to_vec(), elements: 0 }
    }

    /// Appends one element: `None` is SQL NULL; any text is quoted, so that `NULL`, empty
    /// strings, braces, commas and white space stay values.
    pub fn push(&mut self, value: Option<&[u8]>) {
        if self.elements > 0 {
            self.text.push(b',');
        }
        self.elements += 1;
        let Some(value) = value else {
            self.text.extend_from_slice(b"NULL");
            return;
        };
        self.text.push(b'"');
        for &byte in value {
            if byte == b'"' || byte == b'\\' {
                self.text.push(b'\\');
            }
            self.text.push(byte);
        }
        self.text.push(b'"');
    }

    pub fn len(&self) -> usize {
        self.elements
    }

    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }

    /// Bytes of the literal so far.
    pub fn size(&self) -> usize {
        self.text.len() + 1
    }

    /// The literal, closed.
    pub fn finish(mut self) -> Vec<u8> {
        self.text.push(b'}');
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::ArrayLiteral;

    fn literal(values: &[Option<&str>]) -> String {
        let mut array = ArrayLiteral::new();
        for value in values {
            array.push(value.map(str::as_bytes));
        }
        String::from_utf8(array.finish()).expect("utf8")
    }

    #[test]
    fn empty_array() {
        assert_eq!(literal(&[]), "{}");
        assert!(ArrayLiteral::new().is_empty());
    }

    #[test]
    fn values_are_quoted_and_nulls_are_bare() {
        assert_eq!(literal(&[Some("1"), None, Some("NULL"), Some("")]), r#"{"1",NULL,"NULL",""}"#);
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(literal(&[Some(r#"a"b\c"#), Some("{x, y}"), Some(" sp ")]), r#"{"a\"b\\c","{x, y}"," sp "}"#);
    }

    #[test]
    fn non_ascii_text_passes_through() {
        assert_eq!(literal(&[Some("日本語"), Some("Ünïcödé")]), r#"{"日本語","Ünïcödé"}"#);
    }

    #[test]
    fn counts_elements() {
        let mut array = ArrayLiteral::new();
        array.push(None);
        array.push(Some(b"x"));
        assert_eq!(array.len(), 2);
        assert_eq!(array.size(), r#"{NULL,"x"}"#.len());
    }
}
