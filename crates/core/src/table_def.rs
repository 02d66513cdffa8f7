//! A table's definition as data, the DDL that recreates it as a shard, and the shard DDL
//! that follows a change of the definition (the difference between two snapshots).
//!
//! All SQL pieces inside (types, expressions, constraint definitions, index elements) come
//! from PostgreSQL's ruleutils; identifiers are quoted by the `quote` function the caller
//! passes (PostgreSQL's quote_identifier in the extension).

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    pub type_sql: String,
    pub type_oid: u32,
    pub not_null: bool,
    pub collation_sql: Option<String>,
    /// The default as it runs on a shard; `None` when there is none or only the coordinator
    /// can evaluate it (it uses a sequence or another relation, or it is an identity).
    pub shard_default: Option<String>,
    /// True when the coordinator must compute this column's value.
    pub coordinator_default: bool,
    pub generated_sql: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub name: String,
    /// 'c' check, 'p' primary key, 'u' unique, 'x' exclusion, 'f' foreign key, 't' trigger
    pub kind: char,
    pub definition: String,
    pub columns: Vec<i16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    pub nulls_not_distinct: bool,
    pub method: String,
    pub key_count: usize,
    /// Key columns (rendered with collation, opclass and ordering) then INCLUDE columns.
    pub elements: Vec<String>,
    pub predicate: Option<String>,
    pub columns: Vec<i16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDefinition {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub constraints: Vec<Constraint>,
    pub indexes: Vec<Index>,
}

/// Name of a shard-local object: `<name>_<shard id>`. A name too long for that to fit in an
/// identifier is cut (on a character boundary) and followed by a hash of the whole name,
/// `<start of name>_<8 hex digits>_<shard id>`, so that two long names with the same start
/// (an index and its table's, `..._pkey`) still name different objects on the shards.
pub fn shard_object_name(name: &str, shard_id: i64) -> String {
    let suffix = format!("_{shard_id}");
    if name.len() + suffix.len() <= MAX_IDENTIFIER_BYTES {
        return format!("{name}{suffix}");
    }
    let tag = format!("_{:08x}", xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32);
    let limit = MAX_IDENTIFIER_BYTES.saturating_sub(suffix.len() + tag.len());
    let mut cut = name.len().min(limit);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tag}{suffix}", &name[..cut])
}

/// Constraints that own an index get per-shard names: index names are unique per schema.
fn shard_constraint_name(constraint: &Constraint, shard_id: i64) -> String {
    match constraint.kind {
        'p' | 'u' | 'x' => shard_object_name(&constraint.name, shard_id),
        _ => constraint.name.clone(),
    }
}

pub type Quote<'a> = &'a dyn Fn(&str) -> String;

impl TableDefinition {
    pub fn shard_name(&self, shard_id: i64, quote: Quote<'_>) -> String {
        format!("{}.{}", quote(&self.schema), quote(&shard_object_name(&self.name, shard_id)))
    }

    pub fn column_sql(column: &Column, quote: Quote<'_>) -> String {
        let mut sql = format!("{} {}", quote(&column.name), column.type_sql);
        if let Some(collation) = &column.collation_sql {
            sql.push_str(&format!(" COLLATE {collation}"));
        }
        if let Some(generated) = &column.generated_sql {
            sql.push_str(&format!(" GENERATED ALWAYS AS ({generated}) STORED"));
        } else if let Some(default) = &column.shard_default {
            sql.push_str(&format!(" DEFAULT {default}"));
        }
        if column.not_null {
            sql.push_str(" NOT NULL");
        }
        sql
    }

    fn constraint_sql(constraint: &Constraint, shard_id: i64, quote: Quote<'_>) -> Option<String> {
        match constraint.kind {
            'p' | 'u' | 'x' | 'c' => Some(format!(
                "CONSTRAINT {} {}",
                quote(&shard_constraint_name(constraint, shard_id)),
                constraint.definition
            )),
            _ => None,
        }
    }

    /// Statements creating this table as shard `shard_id` (the schema must exist).
    pub fn shard_ddl(&self, shard_id: i64, quote: Quote<'_>) -> Vec<String> {
        let mut elements: Vec<String> = self.columns.iter().map(|c| Self::column_sql(c, quote)).collect();
        elements.extend(self.constraints.iter().filter_map(|c| Self::constraint_sql(c, shard_id, quote)));
        let mut statements =
            vec![format!("CREATE TABLE {} ({})", self.shard_name(shard_id, quote), elements.join(", "))];
        statements.extend(self.indexes.iter().map(|index| self.index_ddl(index, shard_id, quote)));
        statements
    }

    pub fn index_ddl(&self, index: &Index, shard_id: i64, quote: Quote<'_>) -> String {
        self.index_ddl_with(index, shard_id, quote, false)
    }

    /// CREATE INDEX for a shard, optionally CONCURRENTLY (then it must run outside a
    /// transaction block, one statement at a time).
    pub fn index_ddl_with(&self, index: &Index, shard_id: i64, quote: Quote<'_>, concurrently: bool) -> String {
        let (keys, included) = index.elements.split_at(index.key_count.min(index.elements.len()));
        let mut sql = format!(
            "CREATE {}INDEX {}{} ON {} USING {} ({})",
            if index.unique { "UNIQUE " } else { "" },
            if concurrently { "CONCURRENTLY " } else { "" },
            quote(&shard_object_name(&index.name, shard_id)),
            self.shard_name(shard_id, quote),
            quote(&index.method),
            keys.join(", ")
        );
        if !included.is_empty() {
            sql.push_str(&format!(" INCLUDE ({})", included.join(", ")));
        }
        if index.nulls_not_distinct {
            sql.push_str(" NULLS NOT DISTINCT");
        }
        if let Some(predicate) = &index.predicate {
            sql.push_str(&format!(" WHERE {predicate}"));
        }
        sql
    }
}

/// What changed between two snapshots of one table, as shard DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    RenameTable { from: String, to: String },
    AddColumn(Column),
    DropColumn(String),
    RenameColumn { from: String, to: String },
    AlterType(Column),
    SetDefault(Column),
    DropDefault(String),
    SetNotNull(String),
    DropNotNull(String),
    AddConstraint(Constraint),
    DropConstraint(Constraint),
    RenameConstraint { from: Constraint, to: String },
    /// VALIDATE CONSTRAINT of a key or check that was NOT VALID.
    ValidateConstraint(Constraint),
    CreateIndex(Index),
    DropIndex(String),
    RenameIndex { from: String, to: String },
}

/// The changes that turn `before` into `after`. Columns are matched by attnum (so a rename is a
/// rename); constraints and indexes by name, except that an object whose only change is its
/// name is a rename.
pub fn diff(before: &TableDefinition, after: &TableDefinition) -> Vec<Change> {
    // Order matters on the shard: constraints and indexes go before the columns they use
    // (dropping a column drops them too), and new ones come after the columns they need.
    let mut changes = Vec::new();
    if before.name != after.name {
        changes.push(Change::RenameTable { from: before.name.clone(), to: after.name.clone() });
    }
    let mut additions = Vec::new();

    let removed: Vec<&Constraint> =
        before.constraints.iter().filter(|c| !after.constraints.iter().any(|n| n.name == c.name)).collect();
    let added: Vec<&Constraint> =
        after.constraints.iter().filter(|c| !before.constraints.iter().any(|o| o.name == c.name)).collect();
    let mut renamed_to: Vec<&str> = Vec::new();
    for old in &removed {
        let same = added.iter().find(|n| {
            n.kind == old.kind && n.definition == old.definition && !renamed_to.contains(&n.name.as_str())
        });
        match same {
            Some(new) if removed.len() == added.len() => {
                renamed_to.push(&new.name);
                changes.push(Change::RenameConstraint { from: (*old).clone(), to: new.name.clone() });
            }
            _ => changes.push(Change::DropConstraint((*old).clone())),
        }
    }
    for new in added {
        if !renamed_to.contains(&new.name.as_str()) {
            additions.push(Change::AddConstraint(new.clone()));
        }
    }
    for new in &after.constraints {
        let was_not_valid = before.constraints.iter().any(|old| {
            old.name == new.name && old.definition.strip_suffix(" NOT VALID") == Some(new.definition.as_str())
        });
        if was_not_valid {
            additions.push(Change::ValidateConstraint(new.clone()));
        }
    }

    let removed: Vec<&Index> = before.indexes.iter().filter(|i| !after.indexes.iter().any(|n| n.name == i.name)).collect();
    let added: Vec<&Index> = after.indexes.iter().filter(|i| !before.indexes.iter().any(|o| o.name == i.name)).collect();
    let mut renamed_to: Vec<&str> = Vec::new();
    for old in &removed {
        let same = added.iter().find(|n| {
            Index { name: old.name.clone(), ..(**n).clone() } == **old && !renamed_to.contains(&n.name.as_str())
        });
        match same {
            Some(new) if removed.len() == added.len() => {
                renamed_to.push(&new.name);
                changes.push(Change::RenameIndex { from: old.name.clone(), to: new.name.clone() });
            }
            _ => changes.push(Change::DropIndex(old.name.clone())),
        }
    }
    for new in added {
        if !renamed_to.contains(&new.name.as_str()) {
            additions.push(Change::CreateIndex(new.clone()));
        }
    }

    for old in &before.columns {
        match after.columns.iter().find(|c| c.attnum == old.attnum) {
            None => changes.push(Change::DropColumn(old.name.clone())),
            Some(new) => {
                if new.name != old.name {
                    changes.push(Change::RenameColumn { from: old.name.clone(), to: new.name.clone() });
                }
                if new.type_sql != old.type_sql || new.collation_sql != old.collation_sql {
                    changes.push(Change::AlterType(new.clone()));
                }
                if new.shard_default != old.shard_default {
                    match &new.shard_default {
                        Some(_) => changes.push(Change::SetDefault(new.clone())),
                        None => changes.push(Change::DropDefault(new.name.clone())),
                    }
                }
                if new.not_null != old.not_null {
                    changes.push(if new.not_null {
                        Change::SetNotNull(new.name.clone())
                    } else {
                        Change::DropNotNull(new.name.clone())
                    });
                }
            }
        }
    }
    for new in &after.columns {
        if !before.columns.iter().any(|c| c.attnum == new.attnum) {
            changes.push(Change::AddColumn(new.clone()));
        }
    }
    changes.extend(additions);
    changes
}

impl Change {
    /// The statement for shard `shard_id` when the user's statement was CONCURRENTLY: only index
    /// creation and removal have such a form; everything else as `shard_sql`.
    pub fn shard_sql_concurrently(&self, table: &TableDefinition, shard_id: i64, quote: Quote<'_>) -> String {
        match self {
            Change::CreateIndex(index) => table.index_ddl_with(index, shard_id, quote, true),
            Change::DropIndex(name) => format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                quote(&table.schema),
                quote(&shard_object_name(name, shard_id))
            ),
            other => other.shard_sql(table, shard_id, quote),
        }
    }

    /// The statement applying this change to shard `shard_id` of `table` (the definition after
    /// the change; for a table rename, the shard still has the old name).
    pub fn shard_sql(&self, table: &TableDefinition, shard_id: i64, quote: Quote<'_>) -> String {
        let shard = table.shard_name(shard_id, quote);
        let alter = |action: String| format!("ALTER TABLE {shard} {action}");
        match self {
            Change::RenameTable { from, to } => format!(
                "ALTER TABLE {}.{} RENAME TO {}",
                quote(&table.schema),
                quote(&shard_object_name(from, shard_id)),
                quote(&shard_object_name(to, shard_id))
            ),
            Change::AddColumn(column) => alter(format!("ADD COLUMN {}", TableDefinition::column_sql(column, quote))),
            // CASCADE: what depends on it on the coordinator was dropped there (PostgreSQL has
            // refused the statement otherwise), the same objects go on the shard: foreign keys
            // of other shards included.
            Change::DropColumn(name) => alter(format!("DROP COLUMN {} CASCADE", quote(name))),
            Change::RenameColumn { from, to } => alter(format!("RENAME COLUMN {} TO {}", quote(from), quote(to))),
            Change::AlterType(column) => {
                let mut sql = format!("ALTER COLUMN {} TYPE {}", quote(&column.name), column.type_sql);
                if let Some(collation) = &column.collation_sql {
                    sql.push_str(&format!(" COLLATE {collation}"));
                }
                alter(sql)
            }
            Change::SetDefault(column) => alter(format!(
                "ALTER COLUMN {} SET DEFAULT {}",
                quote(&column.name),
                column.shard_default.clone().unwrap_or_default()
            )),
            Change::DropDefault(name) => alter(format!("ALTER COLUMN {} DROP DEFAULT", quote(name))),
            Change::SetNotNull(name) => alter(format!("ALTER COLUMN {} SET NOT NULL", quote(name))),
            Change::DropNotNull(name) => alter(format!("ALTER COLUMN {} DROP NOT NULL", quote(name))),
            Change::AddConstraint(constraint) => {
                alter(format!("ADD {}", TableDefinition::constraint_sql(constraint, shard_id, quote).unwrap_or_default()))
            }
            Change::DropConstraint(constraint) => {
                alter(format!("DROP CONSTRAINT IF EXISTS {} CASCADE", quote(&shard_constraint_name(constraint, shard_id))))
            }
            Change::RenameConstraint { from, to } => alter(format!(
                "RENAME CONSTRAINT {} TO {}",
                quote(&shard_constraint_name(from, shard_id)),
                quote(&shard_constraint_name(&Constraint { name: to.clone(), ..from.clone() }, shard_id))
            )),
            Change::CreateIndex(index) => table.index_ddl(index, shard_id, quote),
            Change::DropIndex(name) => {
                format!("DROP INDEX IF EXISTS {}.{} CASCADE", quote(&table.schema), quote(&shard_object_name(name, shard_id)))
            }
            Change::ValidateConstraint(constraint) => {
                alter(format!("VALIDATE CONSTRAINT {}", quote(&shard_constraint_name(constraint, shard_id))))
            }
            Change::RenameIndex { from, to } => format!(
                "ALTER INDEX {}.{} RENAME TO {}",
                quote(&table.schema),
                quote(&shard_object_name(from, shard_id)),
                quote(&shard_object_name(to, shard_id))
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> String {
        format!("\"{}\"", name.replace('"', "\"\""))
    }

    fn column(attnum: i16, name: &str, type_sql: &str) -> Column {
        Column {
            attnum,
            name: name.into(),
            type_sql: type_sql.into(),
            type_oid: 20,
            not_null: false,
            collation_sql: None,
            shard_default: None,
            coordinator_default: false,
            generated_sql: None,
        }
    }

    fn table() -> TableDefinition {
        TableDefinition {
            schema: "public".into(),
            name: "events".into(),
            columns: vec![column(1, "id", "bigint"), column(2, "note", "text")],
            constraints: vec![Constraint {
                name: "events_pkey".into(),
                kind: 'p',
                definition: "PRIMARY KEY (id)".into(),
                columns: vec![1],
            }],
            indexes: vec![],
        }
    }

    #[test]
    fn shard_object_names_keep_the_suffix() {
        assert_eq!(shard_object_name("events", 102008), "events_102008");
        let long = "x".repeat(70);
        let name = shard_object_name(&long, 102008);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_102008"));
        let multibyte = "é".repeat(40); // 80 bytes
        let name = shard_object_name(&multibyte, 7);
        assert!(name.len() <= 63 && name.ends_with("_7"));
        // Names that fit exactly are kept; longer ones with the same start stay apart.
        let fits = "y".repeat(56);
        assert_eq!(shard_object_name(&fits, 102008), format!("{fits}_102008"));
        let table = "t".repeat(60);
        let pkey = format!("{}_pkey", "t".repeat(58));
        assert_ne!(shard_object_name(&table, 102008), shard_object_name(&pkey, 102008));
        assert_ne!(shard_object_name(&format!("{}1", "i".repeat(57)), 5), shard_object_name(&format!("{}2", "i".repeat(57)), 5));
        assert_eq!(shard_object_name(&table, 102008), shard_object_name(&table, 102008));
    }

    #[test]
    fn shard_ddl_renames_index_owning_constraints_only() {
        let mut t = table();
        t.constraints.push(Constraint { name: "positive".into(), kind: 'c', definition: "CHECK ((id > 0))".into(), columns: vec![1] });
        let ddl = t.shard_ddl(5, &q);
        assert_eq!(
            ddl[0],
            "CREATE TABLE \"public\".\"events_5\" (\"id\" bigint, \"note\" text, \
             CONSTRAINT \"events_pkey_5\" PRIMARY KEY (id), CONSTRAINT \"positive\" CHECK ((id > 0)))"
        );
    }

    #[test]
    fn diff_finds_column_changes() {
        let before = table();
        let mut after = table();
        after.columns[1].name = "comment".into();
        after.columns[0].not_null = true;
        after.columns.push(Column { shard_default: Some("0".into()), ..column(3, "amount", "numeric(12,2)") });
        let changes = diff(&before, &after);
        assert_eq!(
            changes,
            vec![
                Change::SetNotNull("id".into()),
                Change::RenameColumn { from: "note".into(), to: "comment".into() },
                Change::AddColumn(after.columns[2].clone()),
            ]
        );
        let sql: Vec<String> = changes.iter().map(|c| c.shard_sql(&after, 9, &q)).collect();
        assert_eq!(sql[2], "ALTER TABLE \"public\".\"events_9\" ADD COLUMN \"amount\" numeric(12,2) DEFAULT 0");
    }

    #[test]
    fn diff_tells_renames_from_drop_and_add() {
        let before = table();
        let mut renamed = table();
        renamed.constraints[0].name = "events_pk".into();
        assert_eq!(
            diff(&before, &renamed),
            vec![Change::RenameConstraint { from: before.constraints[0].clone(), to: "events_pk".into() }]
        );
        assert_eq!(
            diff(&before, &renamed)[0].shard_sql(&renamed, 3, &q),
            "ALTER TABLE \"public\".\"events_3\" RENAME CONSTRAINT \"events_pkey_3\" TO \"events_pk_3\""
        );
        let mut dropped = table();
        dropped.constraints.clear();
        assert_eq!(diff(&before, &dropped), vec![Change::DropConstraint(before.constraints[0].clone())]);
    }

    #[test]
    fn constraint_drops_come_before_column_drops() {
        let mut before = table();
        before.constraints.push(Constraint { name: "note_set".into(), kind: 'c', definition: "CHECK ((note <> ''))".into(), columns: vec![2] });
        let mut after = table();
        after.columns.truncate(1);
        let changes = diff(&before, &after);
        assert_eq!(changes, vec![Change::DropConstraint(before.constraints[1].clone()), Change::DropColumn("note".into())]);
        assert_eq!(changes[0].shard_sql(&after, 1, &q), "ALTER TABLE \"public\".\"events_1\" DROP CONSTRAINT IF EXISTS \"note_set\" CASCADE");
        assert_eq!(changes[1].shard_sql(&after, 1, &q), "ALTER TABLE \"public\".\"events_1\" DROP COLUMN \"note\" CASCADE");
    }

    #[test]
    fn validating_a_not_valid_constraint() {
        let key = |definition: &str| Constraint { name: "fk".into(), kind: 'f', definition: definition.into(), columns: vec![1] };
        let mut before = table();
        before.constraints.push(key("FOREIGN KEY (id) REFERENCES other(id) NOT VALID"));
        let mut after = table();
        after.constraints.push(key("FOREIGN KEY (id) REFERENCES other(id)"));
        let changes = diff(&before, &after);
        assert_eq!(changes, vec![Change::ValidateConstraint(after.constraints[1].clone())]);
        assert_eq!(changes[0].shard_sql(&after, 2, &q), "ALTER TABLE \"public\".\"events_2\" VALIDATE CONSTRAINT \"fk\"");
        assert!(diff(&after, &after).is_empty());
    }

    #[test]
    fn diff_renames_the_table() {
        let before = table();
        let after = TableDefinition { name: "ev".into(), ..table() };
        let changes = diff(&before, &after);
        assert_eq!(changes, vec![Change::RenameTable { from: "events".into(), to: "ev".into() }]);
        assert_eq!(changes[0].shard_sql(&after, 4, &q), "ALTER TABLE \"public\".\"events_4\" RENAME TO \"ev_4\"");
    }

    #[test]
    fn diff_of_indexes() {
        let before = table();
        let index = Index {
            name: "by_note".into(),
            unique: false,
            nulls_not_distinct: false,
            method: "btree".into(),
            key_count: 1,
            elements: vec!["note ASC NULLS LAST".into()],
            predicate: None,
            columns: vec![2],
        };
        let after = TableDefinition { indexes: vec![index.clone()], ..table() };
        assert_eq!(diff(&before, &after), vec![Change::CreateIndex(index.clone())]);
        assert_eq!(
            diff(&before, &after)[0].shard_sql(&after, 2, &q),
            "CREATE INDEX \"by_note_2\" ON \"public\".\"events_2\" USING \"btree\" (note ASC NULLS LAST)"
        );
        assert_eq!(
            diff(&before, &after)[0].shard_sql_concurrently(&after, 2, &q),
            "CREATE INDEX CONCURRENTLY \"by_note_2\" ON \"public\".\"events_2\" USING \"btree\" (note ASC NULLS LAST)"
        );
        assert_eq!(
            diff(&after, &before)[0].shard_sql_concurrently(&before, 2, &q),
            "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"by_note_2\""
        );
        let renamed = TableDefinition { indexes: vec![Index { name: "n".into(), ..index.clone() }], ..table() };
        assert_eq!(diff(&after, &renamed), vec![Change::RenameIndex { from: "by_note".into(), to: "n".into() }]);
        assert_eq!(diff(&after, &before), vec![Change::DropIndex("by_note".into())]);
    }
}
