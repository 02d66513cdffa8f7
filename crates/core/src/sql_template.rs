//! Turning SQL that PostgreSQL's deparser printed into a template whose relation references
//! are slots, filled with shard names per task.
//!
//! The deparser prints every relation schema-qualified (it runs with an empty search_path) and
//! followed by an alias the extension forced on it (`pgs_r<N>`, possibly after `AS`). A lexer
//! that knows SQL's quoting finds exactly those `schema.relation alias` token sequences; a
//! qualified name anywhere else (a function, a type, a column) is left as it is. Nothing here
//! edits a user's text: the input is always deparser output.

/// A piece of a template: literal SQL text or the position of a relation reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// Index into the caller's relation list.
    Relation(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    /// The SQL with each relation slot replaced by `name_of(index)`.
    pub fn render(&self, mut name_of: impl FnMut(usize) -> String) -> String {
        let mut sql = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => sql.push_str(text),
                Piece::Relation(index) => sql.push_str(&name_of(*index)),
            }
        }
        sql
    }

    /// Relation indexes in the order they appear.
    pub fn relations(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Relation(i) => Some(*i),
            Piece::Text(_) => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// An identifier or keyword; `name` is its value (case-folded if unquoted).
    Ident { name: String, quoted: bool },
    Dot,
    Other,
    Space,
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LexError(pub String);

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Splits `sql` into tokens. Strings (standard, E'', dollar-quoted), quoted identifiers and
/// comments are single tokens, so nothing inside them is ever mistaken for a name.
fn tokens(sql: &str) -> Result<Vec<Token>, LexError> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            Kind::Space
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            Kind::Space
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            loop {
                if i + 1 >= b.len() {
                    return Err(LexError("unterminated comment".into()));
                }
                if b[i] == b'/' && b[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            Kind::Space
        } else if c == b'\'' || ((c == b'E' || c == b'e') && b.get(i + 1) == Some(&b'\'')) {
            let escapes = c != b'\'';
            i += if escapes { 2 } else { 1 };
            loop {
                match b.get(i) {
                    None => return Err(LexError("unterminated string".into())),
                    Some(b'\\') if escapes => i += 2,
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            Kind::Other
        } else if c == b'"' {
            i += 1;
            let mut name = String::new();
            loop {
                match b.get(i) {
                    None => return Err(LexError("unterminated quoted identifier".into())),
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                        name.push('"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => {
                        let next = sql[i..].chars().next().unwrap_or('\u{fffd}');
                        name.push(next);
                        i += next.len_utf8();
                    }
                }
            }
            Kind::Ident { name, quoted: true }
        } else if c == b'$' && dollar_tag(&b[i..]).is_some() {
            let tag_len = dollar_tag(&b[i..]).unwrap_or(0);
            let tag = &b[i..i + tag_len];
            i += tag_len;
            loop {
                if i >= b.len() {
                    return Err(LexError("unterminated dollar-quoted string".into()));
                }
                if b[i..].starts_with(tag) {
                    i += tag_len;
                    break;
                }
                i += 1;
            }
            Kind::Other
        } else if is_ident_start(c) {
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            Kind::Ident { name: sql[start..i].to_ascii_lowercase(), quoted: false }
        } else if c == b'.' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i += 1;
            Kind::Dot
        } else if c.is_ascii_digit() || c == b'.' {
            // Numbers, including 1.5e-3; a following identifier character is part of it.
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'-') | Some(b'+')) {
                    i += 1;
                }
                i += 1;
            }
            Kind::Other
        } else {
            // One character of punctuation or an operator; `$1` params land here and in numbers.
            i += sql[i..].chars().next().map_or(1, char::len_utf8);
            Kind::Other
        };
        out.push(Token { kind, start, end: i });
    }
    Ok(out)
}

/// Length of a dollar-quote opening tag (`$$` or `$tag$`) at the start of `b`, if it is one.
fn dollar_tag(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'$') {
        return None;
    }
    let mut i = 1;
    if b.get(1).is_some_and(|c| is_ident_start(*c)) {
        while i < b.len() && is_ident_char(b[i]) && b[i] != b'$' {
            i += 1;
        }
    }
    (b.get(i) == Some(&b'$')).then_some(i + 1)
}

/// The prefix of aliases the extension forces on relations before deparsing.
pub const ALIAS_PREFIX: &str = "pgs_r";

/// Builds a template from deparser output: every `schema . relation [AS] alias` whose alias
/// starts with [`ALIAS_PREFIX`] and for which `lookup(schema, relation)` gives an index becomes
/// a relation slot (the alias stays).
pub fn parse(sql: &str, lookup: impl Fn(&str, &str) -> Option<usize>) -> Result<Template, LexError> {
    let toks = tokens(sql)?;
    let significant: Vec<usize> = (0..toks.len()).filter(|&i| toks[i].kind != Kind::Space).collect();
    let ident = |k: usize| match significant.get(k).map(|&i| &toks[i].kind) {
        Some(Kind::Ident { name, quoted }) => Some((name.as_str(), *quoted)),
        _ => None,
    };
    let mut pieces = Vec::new();
    let mut copied_to = 0;
    let mut k = 0;
    while k < significant.len() {
        let matched = (|| {
            let (schema, _) = ident(k)?;
            if significant.get(k + 1).map(|&i| &toks[i].kind) != Some(&Kind::Dot) {
                return None;
            }
            let (relation, _) = ident(k + 2)?;
            let mut alias_at = k + 3;
            if let Some(("as", false)) = ident(alias_at) {
                alias_at += 1;
            }
            let (alias, _) = ident(alias_at)?;
            if !alias.starts_with(ALIAS_PREFIX) {
                return None;
            }
            // A dotted name before this one (a.b.c) is not a relation reference.
            if k > 0 && significant.get(k - 1).map(|&i| &toks[i].kind) == Some(&Kind::Dot) {
                return None;
            }
            Some(lookup(schema, relation)?)
        })();
        if let Some(index) = matched {
            let start = toks[significant[k]].start;
            let end = toks[significant[k + 2]].end;
            if start > copied_to {
                pieces.push(Piece::Text(sql[copied_to..start].to_string()));
            }
            pieces.push(Piece::Relation(index));
            copied_to = end;
            k += 3;
        } else {
            k += 1;
        }
    }
    if copied_to < sql.len() {
        pieces.push(Piece::Text(sql[copied_to..].to_string()));
    }
    Ok(Template { pieces })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(schema: &str, relation: &str) -> Option<usize> {
        match (schema, relation) {
            ("public", "users") => Some(0),
            ("Sales", "Orders") => Some(1),
            ("public", "we\"ird") => Some(2),
            _ => None,
        }
    }

    fn render(sql: &str) -> String {
        parse(sql, lookup).unwrap().render(|i| format!("<{i}>"))
    }

    #[test]
    fn replaces_qualified_relations_with_forced_aliases() {
        assert_eq!(
            render("SELECT pgs_r1.id FROM public.users pgs_r1 JOIN \"Sales\".\"Orders\" pgs_r2 ON pgs_r1.id = pgs_r2.user_id"),
            "SELECT pgs_r1.id FROM <0> pgs_r1 JOIN <1> pgs_r2 ON pgs_r1.id = pgs_r2.user_id"
        );
        assert_eq!(render("INSERT INTO public.users AS pgs_r1 (id) VALUES ($1)"), "INSERT INTO <0> AS pgs_r1 (id) VALUES ($1)");
        assert_eq!(render("UPDATE ONLY public.users pgs_r1_1 SET x = 1"), "UPDATE ONLY <0> pgs_r1_1 SET x = 1");
        assert_eq!(render("SELECT 1 FROM public.\"we\"\"ird\" pgs_r3"), "SELECT 1 FROM <2> pgs_r3");
    }

    #[test]
    fn leaves_everything_else_alone() {
        // Unquoted names fold to lower case: "Sales" and Sales are different schemas.
        assert_eq!(render("SELECT 1 FROM Sales.Orders pgs_r1"), "SELECT 1 FROM Sales.Orders pgs_r1");
        // Functions, casts, column references, strings, comments and quoted aliases.
        for sql in [
            "SELECT public.users(pgs_r1.*) FROM t pgs_r1",
            "SELECT ROW(1)::public.users FROM t pgs_r1",
            "SELECT 'public.users pgs_r1' FROM t x",
            "SELECT E'it\\'s public.users pgs_r1' FROM t x",
            "SELECT $q$ public.users pgs_r1 $q$ FROM t x",
            "SELECT 1 /* public.users pgs_r1 /* nested */ */ FROM t x",
            "SELECT 1 -- public.users pgs_r1\nFROM t x",
            "SELECT public.users pgs FROM t x",
            "SELECT x.public.users pgs_r1 FROM t x",
            "SELECT 1 FROM public.users \"Pgs_r1\"",
        ] {
            assert_eq!(render(sql), sql, "{sql}");
        }
    }

    #[test]
    fn numbers_and_params_are_not_names() {
        assert_eq!(render("SELECT 1.5e-3, $1, .5 FROM public.users pgs_r1"), "SELECT 1.5e-3, $1, .5 FROM <0> pgs_r1");
    }

    #[test]
    fn unterminated_input_is_an_error() {
        assert!(parse("SELECT 'abc", lookup).is_err());
        assert!(parse("SELECT \"abc", lookup).is_err());
        assert!(parse("SELECT $$abc", lookup).is_err());
        assert!(parse("SELECT /* abc", lookup).is_err());
    }

    #[test]
    fn non_ascii_identifiers() {
        let sql = "SELECT pgs_r1.\"名前\" FROM public.users pgs_r1 WHERE pgs_r1.\"名前\" = 'ö'";
        assert_eq!(render(sql), "SELECT pgs_r1.\"名前\" FROM <0> pgs_r1 WHERE pgs_r1.\"名前\" = 'ö'");
    }
}
