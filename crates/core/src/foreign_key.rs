//! Foreign keys between sharded tables: which ones shards can enforce, and the DDL that
//! creates one on a shard.
//!
//! A shard can enforce a foreign key only when every referenced row lives on the same node as
//! the referencing row:
//! - the referenced table is a reference table (a copy on every node);
//! - or both tables are distributed, co-located, and the key maps the referencing table's
//!   distribution column onto the referenced table's (a row and the row it references then
//!   hash to the same shard index).
//!
//! A referential action must not change the distribution column of a distributed table: the
//! row would stay in a shard its new value does not hash to.

/// A foreign key as the catalog holds it (names of columns, actions as pg_constraint codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub attnums: Vec<i16>,
    pub referenced_relid: u32,
    pub referenced_schema: String,
    pub referenced_name: String,
    pub referenced_columns: Vec<String>,
    pub referenced_attnums: Vec<i16>,
    /// pg_constraint.confmatchtype: 'f' full, 's' simple, 'p' partial.
    pub match_type: char,
    /// pg_constraint.confupdtype / confdeltype: 'a' no action, 'r' restrict, 'c' cascade,
    /// 'n' set null, 'd' set default.
    pub on_update: char,
    pub on_delete: char,
    /// ON DELETE SET NULL / SET DEFAULT (columns): empty means every key column.
    pub delete_set_columns: Vec<i16>,
    pub deferrable: bool,
    pub deferred: bool,
    pub validated: bool,
}

/// What a table is, as far as its foreign keys are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    Reference,
    Distributed { colocation: Option<i32>, distribution_attnum: i16 },
}

/// Why shards cannot enforce a foreign key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The referenced table is a local table: the nodes do not have its rows.
    ReferencesLocal,
    /// A local table references a distributed table: the coordinator does not hold its rows.
    LocalToDistributed,
    /// A reference table references a distributed table: its copies would reference rows the
    /// node does not hold.
    ReferenceToDistributed,
    /// The tables are not in one colocation group.
    NotColocated,
    /// The key does not map the distribution column onto the referenced distribution column.
    NotOnDistributionColumns,
    /// The action (ON UPDATE / ON DELETE, as SQL) would change the distribution column.
    ChangesDistributionColumn(&'static str),
}

fn action_sql(code: char) -> Option<&'static str> {
    match code {
        'r' => Some("RESTRICT"),
        'c' => Some("CASCADE"),
        'n' => Some("SET NULL"),
        'd' => Some("SET DEFAULT"),
        _ => None,
    }
}

impl ForeignKey {
    /// Checks that shards of `referencing` can enforce this key to `referenced` (pass the same
    /// kind for a key of a table to itself).
    pub fn check(&self, referencing: Kind, referenced: Kind) -> Result<(), Problem> {
        let attnum = match referencing {
            Kind::Local => {
                return match referenced {
                    Kind::Distributed { .. } => Err(Problem::LocalToDistributed),
                    _ => Ok(()),
                }
            }
            Kind::Reference => {
                return match referenced {
                    Kind::Reference => Ok(()),
                    Kind::Local => Err(Problem::ReferencesLocal),
                    Kind::Distributed { .. } => Err(Problem::ReferenceToDistributed),
                }
            }
            Kind::Distributed { distribution_attnum, .. } => distribution_attnum,
        };
        match (referencing, referenced) {
            (_, Kind::Local) => return Err(Problem::ReferencesLocal),
            (_, Kind::Reference) => {}
            (Kind::Distributed { colocation: ours, .. }, Kind::Distributed { colocation: theirs, distribution_attnum }) => {
                if ours.is_none() || ours != theirs {
                    return Err(Problem::NotColocated);
                }
                let position = self.attnums.iter().position(|a| *a == attnum);
                if position.and_then(|p| self.referenced_attnums.get(p)) != Some(&distribution_attnum) {
                    return Err(Problem::NotOnDistributionColumns);
                }
            }
            _ => {}
        }
        if self.attnums.contains(&attnum) {
            if matches!(self.on_update, 'c' | 'n' | 'd') {
                return Err(Problem::ChangesDistributionColumn(match self.on_update {
                    'c' => "ON UPDATE CASCADE",
                    'n' => "ON UPDATE SET NULL",
                    _ => "ON UPDATE SET DEFAULT",
                }));
            }
            let sets = self.delete_set_columns.is_empty() || self.delete_set_columns.contains(&attnum);
            if matches!(self.on_delete, 'n' | 'd') && sets {
                return Err(Problem::ChangesDistributionColumn(if self.on_delete == 'n' {
                    "ON DELETE SET NULL"
                } else {
                    "ON DELETE SET DEFAULT"
                }));
            }
        }
        Ok(())
    }

    /// `ALTER TABLE <shard> ADD CONSTRAINT ... FOREIGN KEY ... REFERENCES <referenced shard>`:
    /// `shard` and `referenced_shard` are qualified, quoted names. A key that is NOT VALID on
    /// the coordinator is NOT VALID on the shard.
    pub fn shard_sql(&self, shard: &str, referenced_shard: &str, quote: &dyn Fn(&str) -> String) -> String {
        let list = |names: &[String]| names.iter().map(|n| quote(n)).collect::<Vec<_>>().join(", ");
        let mut sql = format!(
            "ALTER TABLE {shard} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {referenced_shard} ({})",
            quote(&self.name),
            list(&self.columns),
            list(&self.referenced_columns)
        );
        match self.match_type {
            'f' => sql.push_str(" MATCH FULL"),
            'p' => sql.push_str(" MATCH PARTIAL"),
            _ => {}
        }
        if let Some(action) = action_sql(self.on_update) {
            sql.push_str(&format!(" ON UPDATE {action}"));
        }
        if let Some(action) = action_sql(self.on_delete) {
            sql.push_str(&format!(" ON DELETE {action}"));
            if !self.delete_set_columns.is_empty() && matches!(self.on_delete, 'n' | 'd') {
                let names: Vec<String> = self
                    .delete_set_columns
                    .iter()
                    .filter_map(|a| self.attnums.iter().position(|k| k == a).map(|p| self.columns[p].clone()))
                    .collect();
                sql.push_str(&format!(" ({})", list(&names)));
            }
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
            if self.deferred {
                sql.push_str(" INITIALLY DEFERRED");
            }
        }
        if !self.validated {
            sql.push_str(" NOT VALID");
        }
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> String {
        format!("\"{}\"", name.replace('"', "\"\""))
    }

    /// campaigns (company_id = attnum 1, id = 2) REFERENCES companies (id = 1).
    fn key() -> ForeignKey {
        ForeignKey {
            name: "campaigns_company_fk".into(),
            columns: vec!["company_id".into()],
            attnums: vec![1],
            referenced_relid: 16400,
            referenced_schema: "public".into(),
            referenced_name: "companies".into(),
            referenced_columns: vec!["id".into()],
            referenced_attnums: vec![1],
            match_type: 's',
            on_update: 'a',
            on_delete: 'a',
            delete_set_columns: vec![],
            deferrable: false,
            deferred: false,
            validated: true,
        }
    }

    fn distributed(colocation: i32, attnum: i16) -> Kind {
        Kind::Distributed { colocation: Some(colocation), distribution_attnum: attnum }
    }

    #[test]
    fn colocated_keys_on_the_distribution_columns_are_enforceable() {
        assert_eq!(key().check(distributed(3, 1), distributed(3, 1)), Ok(()));
        // A composite key: the distribution column anywhere in it, mapped to the other's.
        let composite = ForeignKey {
            attnums: vec![2, 1],
            columns: vec!["campaign_id".into(), "company_id".into()],
            referenced_attnums: vec![4, 2],
            referenced_columns: vec!["id".into(), "company_id".into()],
            ..key()
        };
        assert_eq!(composite.check(distributed(3, 1), distributed(3, 2)), Ok(()));
        assert_eq!(composite.check(distributed(3, 1), distributed(3, 4)), Err(Problem::NotOnDistributionColumns));
        assert_eq!(key().check(distributed(3, 2), distributed(3, 1)), Err(Problem::NotOnDistributionColumns));
        assert_eq!(key().check(distributed(3, 1), distributed(4, 1)), Err(Problem::NotColocated));
        assert_eq!(
            key().check(Kind::Distributed { colocation: None, distribution_attnum: 1 }, Kind::Distributed { colocation: None, distribution_attnum: 1 }),
            Err(Problem::NotColocated)
        );
    }

    #[test]
    fn reference_and_local_targets() {
        assert_eq!(key().check(distributed(3, 2), Kind::Reference), Ok(()));
        assert_eq!(key().check(Kind::Reference, Kind::Reference), Ok(()));
        assert_eq!(key().check(Kind::Local, Kind::Reference), Ok(()));
        assert_eq!(key().check(Kind::Local, Kind::Local), Ok(()));
        assert_eq!(key().check(Kind::Local, distributed(3, 1)), Err(Problem::LocalToDistributed));
        assert_eq!(key().check(distributed(3, 1), Kind::Local), Err(Problem::ReferencesLocal));
        assert_eq!(key().check(Kind::Reference, Kind::Local), Err(Problem::ReferencesLocal));
        assert_eq!(key().check(Kind::Reference, distributed(3, 1)), Err(Problem::ReferenceToDistributed));
    }

    #[test]
    fn actions_may_not_change_the_distribution_column() {
        let cascade = ForeignKey { on_delete: 'c', on_update: 'r', ..key() };
        assert_eq!(cascade.check(distributed(3, 1), distributed(3, 1)), Ok(()));
        let set_null = ForeignKey { on_delete: 'n', ..key() };
        assert_eq!(set_null.check(distributed(3, 1), distributed(3, 1)), Err(Problem::ChangesDistributionColumn("ON DELETE SET NULL")));
        // ON UPDATE CASCADE from a reference table into the distribution column.
        let update = ForeignKey { on_update: 'c', ..key() };
        assert_eq!(update.check(distributed(3, 1), Kind::Reference), Err(Problem::ChangesDistributionColumn("ON UPDATE CASCADE")));
        // The same actions on other columns are fine.
        assert_eq!(update.check(distributed(3, 2), Kind::Reference), Ok(()));
        // SET NULL of a column list that leaves the distribution column alone.
        let partial = ForeignKey {
            attnums: vec![1, 2],
            columns: vec!["company_id".into(), "campaign_id".into()],
            referenced_attnums: vec![1, 2],
            referenced_columns: vec!["company_id".into(), "id".into()],
            on_delete: 'n',
            delete_set_columns: vec![2],
            ..key()
        };
        assert_eq!(partial.check(distributed(3, 1), distributed(3, 1)), Ok(()));
    }

    #[test]
    fn shard_sql_spells_out_every_property() {
        assert_eq!(
            key().shard_sql("\"public\".\"campaigns_7\"", "\"public\".\"companies_3\"", &q),
            "ALTER TABLE \"public\".\"campaigns_7\" ADD CONSTRAINT \"campaigns_company_fk\" FOREIGN KEY (\"company_id\") \
             REFERENCES \"public\".\"companies_3\" (\"id\")"
        );
        let all = ForeignKey {
            attnums: vec![1, 2],
            columns: vec!["company_id".into(), "Campaign".into()],
            referenced_attnums: vec![1, 2],
            referenced_columns: vec!["company_id".into(), "id".into()],
            match_type: 'f',
            on_update: 'r',
            on_delete: 'n',
            delete_set_columns: vec![2],
            deferrable: true,
            deferred: true,
            validated: false,
            ..key()
        };
        assert_eq!(
            all.shard_sql("s", "r", &q),
            "ALTER TABLE s ADD CONSTRAINT \"campaigns_company_fk\" FOREIGN KEY (\"company_id\", \"Campaign\") \
             REFERENCES r (\"company_id\", \"id\") MATCH FULL ON UPDATE RESTRICT ON DELETE SET NULL (\"Campaign\") \
             DEFERRABLE INITIALLY DEFERRED NOT VALID"
        );
    }
}
