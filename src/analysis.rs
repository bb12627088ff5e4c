//! Duplicate counting with Polars.
//!
//! For each slice (a list of fields) the batch is grouped by those fields and
//! the rows of each group counted. A duplicate is a group counted at least
//! twice. The report of a slice is exact: the number of groups, the number of
//! duplicate groups, and the first `top` duplicate groups ordered by count
//! descending, then key values ascending (byte order, nulls last), so the same
//! batch always gives the same report. A null value is a value of its own: it
//! groups with the other nulls of its field.

use polars::prelude::*;

use crate::batch::Columns;
use crate::event::Field;

/// Name of the count column; no event field has this name.
const COUNT: &str = "count";

/// One group that occurs at least twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateRow {
    /// The group's values, in the slice's field order.
    pub values: Vec<Option<String>>,
    pub count: u64,
}

/// The duplicate report of one slice over one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceReport {
    pub fields: Vec<Field>,
    /// Distinct value combinations in the batch.
    pub groups: u64,
    /// Combinations that occur at least twice.
    pub duplicate_groups: u64,
    /// The first `top` duplicate groups, in report order.
    pub duplicates: Vec<DuplicateRow>,
}

impl SliceReport {
    /// Whether duplicate groups were left out of `duplicates`.
    pub fn truncated(&self) -> bool {
        (self.duplicates.len() as u64) < self.duplicate_groups
    }
}

/// Loads the columns the slices use into a DataFrame.
pub fn to_frame(columns: &Columns, slices: &[Vec<Field>]) -> PolarsResult<DataFrame> {
    let mut used: Vec<Field> = slices.iter().flatten().copied().collect();
    used.sort();
    used.dedup();
    let cols = used
        .into_iter()
        .map(|field| {
            let src = columns.column(field);
            let mut builder = StringChunkedBuilder::new(field.name().into(), src.len());
            for v in src.iter() {
                match v {
                    Some(s) => builder.append_value(s),
                    None => builder.append_null(),
                }
            }
            builder.finish().into_series().into_column()
        })
        .collect();
    DataFrame::new(columns.len(), cols)
}

/// Counts duplicates of every slice over one batch.
pub fn analyze(
    columns: &Columns,
    slices: &[Vec<Field>],
    top: usize,
) -> PolarsResult<Vec<SliceReport>> {
    let df = to_frame(columns, slices)?;
    slices
        .iter()
        .map(|slice| analyze_slice(&df, slice, top))
        .collect()
}

fn analyze_slice(df: &DataFrame, slice: &[Field], top: usize) -> PolarsResult<SliceReport> {
    let keys: Vec<Expr> = slice.iter().map(|f| col(f.name())).collect();
    let grouped = df
        .clone()
        .lazy()
        .group_by(keys.clone())
        .agg([len().alias(COUNT)])
        .collect()?;
    let groups = grouped.height() as u64;

    let mut order = vec![col(COUNT)];
    order.extend(keys);
    let mut descending = vec![true];
    descending.extend(std::iter::repeat_n(false, slice.len()));
    let dups = grouped
        .lazy()
        .filter(col(COUNT).gt_eq(lit(2)))
        .sort_by_exprs(
            order,
            SortMultipleOptions::default()
                .with_order_descending_multi(descending)
                .with_nulls_last(true),
        )
        .collect()?;
    let duplicate_groups = dups.height() as u64;
    let shown = dups.head(Some(top));

    let counts = shown.column(COUNT)?.cast(&DataType::UInt64)?;
    let counts = counts.u64()?;
    let key_cols: Vec<&StringChunked> = slice
        .iter()
        .map(|f| shown.column(f.name()).and_then(|c| c.str()))
        .collect::<PolarsResult<_>>()?;
    let duplicates = (0..shown.height())
        .map(|i| DuplicateRow {
            values: key_cols
                .iter()
                .map(|c| c.get(i).map(str::to_owned))
                .collect(),
            count: counts.get(i).unwrap_or(0),
        })
        .collect();
    Ok(SliceReport {
        fields: slice.to_vec(),
        groups,
        duplicate_groups,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{LoginEvent, FIELD_COUNT};
    use std::borrow::Cow;

    fn ev<'a>(user: Option<&'a str>, ip: Option<&'a str>) -> LoginEvent<'a> {
        let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
        fields[Field::UserId.index()] = user.map(Cow::Borrowed);
        fields[Field::Ip.index()] = ip.map(Cow::Borrowed);
        LoginEvent {
            fields,
            timestamp_ms: Some(0),
        }
    }

    #[test]
    fn counts_orders_and_truncates() {
        let events = vec![
            ev(Some("b"), Some("1")),
            ev(Some("a"), Some("1")),
            ev(Some("b"), Some("1")),
            ev(Some("a"), Some("1")),
            ev(Some("c"), Some("2")),
            ev(Some("c"), Some("2")),
            ev(Some("c"), Some("2")),
            ev(Some("d"), None),
            ev(Some("d"), None),
            ev(Some("e"), Some("3")),
        ];
        let cols = Columns::from_events(&events);
        let slices = vec![vec![Field::UserId, Field::Ip], vec![Field::Ip]];
        let reports = analyze(&cols, &slices, 3).unwrap();

        let pair = &reports[0];
        assert_eq!((pair.groups, pair.duplicate_groups), (5, 4));
        let rows: Vec<(Vec<Option<&str>>, u64)> = pair
            .duplicates
            .iter()
            .map(|r| (r.values.iter().map(|v| v.as_deref()).collect(), r.count))
            .collect();
        assert_eq!(
            rows,
            vec![
                (vec![Some("c"), Some("2")], 3),
                (vec![Some("a"), Some("1")], 2),
                (vec![Some("b"), Some("1")], 2),
            ]
        );
        assert!(pair.truncated());

        let ip = &reports[1];
        assert_eq!((ip.groups, ip.duplicate_groups), (4, 3));
        let rows: Vec<_> = ip
            .duplicates
            .iter()
            .map(|r| (r.values[0].clone(), r.count))
            .collect();
        assert_eq!(
            rows,
            vec![(Some("1".into()), 4), (Some("2".into()), 3), (None, 2)],
            "nulls group together and sort last among equal counts"
        );
        assert!(!ip.truncated());
    }

    #[test]
    fn no_duplicates_gives_empty_rows() {
        let events = vec![ev(Some("a"), Some("1")), ev(Some("b"), Some("2"))];
        let cols = Columns::from_events(&events);
        let r = analyze(&cols, &[vec![Field::UserId]], 10).unwrap();
        assert_eq!((r[0].groups, r[0].duplicate_groups), (2, 0));
        assert!(r[0].duplicates.is_empty());
    }

    #[test]
    fn an_empty_batch_has_no_groups() {
        let r = analyze(&Columns::default(), &[vec![Field::Ip]], 10).unwrap();
        assert_eq!((r[0].groups, r[0].duplicate_groups), (0, 0));
    }
}
