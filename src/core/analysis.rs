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

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::core::event::Field;
use crate::work::{Columns, StrColumn};

/// Name of the count column; no event field has this name.
const COUNT: &str = "count";

/// The code of a null value in an [`Encoded`] column.
const NULL_CODE: u32 = u32::MAX;

/// A string column, dictionary-encoded for grouping: each row's value as a
/// code into the distinct values, which borrow from the batch.
struct Encoded<'a> {
    codes: Vec<u32>,
    values: Vec<&'a str>,
}

impl<'a> Encoded<'a> {
    fn new(col: &'a StrColumn) -> Encoded<'a> {
        let hasher = foldhash::fast::RandomState::default();
        // Sized for every row being distinct: growing would re-hash every
        // value through the batch buffer, which costs more than the memory.
        let mut index: HashTable<u32> = HashTable::with_capacity(col.len());
        let mut values: Vec<&'a str> = Vec::new();
        let codes = col
            .iter()
            .map(|v| match v {
                None => NULL_CODE,
                Some(v) => {
                    let hash = hasher.hash_one(v);
                    match index.find(hash, |&c| same(values[c as usize], v)) {
                        Some(&c) => c,
                        None => {
                            let c = values.len() as u32;
                            values.push(v);
                            index.insert_unique(hash, c, |&c| hasher.hash_one(values[c as usize]));
                            c
                        }
                    }
                }
            })
            .collect();
        Encoded { codes, values }
    }

    fn distinct(&self) -> usize {
        self.values.len()
    }

    fn decode(&self, code: u32) -> Option<&'a str> {
        (code != NULL_CODE).then(|| self.values[code as usize])
    }
}

/// String equality without a call to `memcmp` for the short values events
/// carry: a hit in the dictionary is compared once per row, and the call
/// costs more than comparing a few words.
#[inline]
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let n = a.len();
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], i: usize| u32::from_le_bytes(s[i..i + 4].try_into().expect("4 bytes"));
    match n {
        0..=3 => a == b,
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=64 => {
            // Whole words, then the last word (overlapping the one before).
            let mut i = 0;
            while i + 8 <= n {
                if word(a, i) != word(b, i) {
                    return false;
                }
                i += 8;
            }
            word(a, n - 8) == word(b, n - 8)
        }
        _ => a == b,
    }
}

/// Encodes the columns the slices use, one thread per column: the encoding
/// hashes every value once, which is most of the per-event cost of analysis.
fn encode_all<'a>(columns: &'a Columns, slices: &[Vec<Field>]) -> Vec<Option<Encoded<'a>>> {
    let mut used = [false; crate::core::event::FIELD_COUNT];
    for f in slices.iter().flatten() {
        used[f.index()] = true;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = Field::ALL
            .iter()
            .map(|f| used[f.index()].then(|| scope.spawn(|| Encoded::new(columns.column(*f)))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.map(|h| h.join().expect("encoding does not panic")))
            .collect()
    })
}

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

/// Counts duplicates of every slice over one batch.
pub fn analyze(
    columns: &Columns,
    slices: &[Vec<Field>],
    top: usize,
) -> PolarsResult<Vec<SliceReport>> {
    analyze_with(columns, slices, top, KeyPlan::Narrowest)
}

/// How [`analyze_with`] keys the rows of a slice for grouping; [`analyze`]
/// uses [`KeyPlan::Narrowest`]. The others are for tests that cover every
/// grouping path.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlan {
    /// A 32-bit packed key where it fits, else 64-bit, else one code column per field.
    Narrowest,
    /// A 64-bit packed key where it fits, else one code column per field.
    Packed64,
    /// One code column per field.
    PerField,
}

/// [`analyze`] with the rows keyed as `plan` says.
#[doc(hidden)]
pub fn analyze_with(
    columns: &Columns,
    slices: &[Vec<Field>],
    top: usize,
    plan: KeyPlan,
) -> PolarsResult<Vec<SliceReport>> {
    let encoded = encode_all(columns, slices);
    let run = |slice: &Vec<Field>| {
        let cols: Vec<&Encoded> = slice
            .iter()
            .map(|f| {
                encoded[f.index()]
                    .as_ref()
                    .expect("used fields are encoded")
            })
            .collect();
        analyze_slice(&cols, columns.len(), slice, top, plan)
    };
    let half = slices.len().div_ceil(2);
    let (first, second) = slices.split_at(half);
    let (a, b) = std::thread::scope(|scope| {
        let h = scope.spawn(|| second.iter().map(run).collect::<Vec<_>>());
        let a: Vec<_> = first.iter().map(run).collect();
        (a, h.join().expect("analysis does not panic"))
    });
    a.into_iter().chain(b).collect()
}

/// How the rows of a slice are keyed for grouping.
enum Keys {
    /// One exact u64 per row: the fields' codes as digits of a mixed-radix
    /// number (radix = distinct values + 1, the last digit value for null).
    Packed(Vec<u64>),
    /// The same, when every key fits in 32 bits: Polars groups 32-bit keys
    /// about twice as fast when there are few groups.
    Packed32(Vec<u32>),
    /// One nullable u32 code column per field, when the packed key would not
    /// fit in 64 bits.
    PerField,
}

fn keys(cols: &[&Encoded], n: usize, plan: KeyPlan) -> Keys {
    let radices: Vec<u64> = cols.iter().map(|c| c.distinct() as u64 + 1).collect();
    // The largest packed key, when it fits in 64 bits.
    let max_key = radices
        .iter()
        .try_fold(1u64, |acc, r| acc.checked_mul(*r))
        .map(|span| span - 1);
    match (plan, max_key) {
        (KeyPlan::Narrowest, Some(k)) if k <= u64::from(u32::MAX) => {
            Keys::Packed32(pack(cols, &radices, n, |k| k as u32))
        }
        (KeyPlan::Narrowest | KeyPlan::Packed64, Some(_)) => {
            Keys::Packed(pack(cols, &radices, n, |k| k))
        }
        _ => Keys::PerField,
    }
}

/// The packed key of every row, narrowed by `narrow` (exact: the caller
/// checked that every key fits).
fn pack<K: Copy>(cols: &[&Encoded], radices: &[u64], n: usize, narrow: fn(u64) -> K) -> Vec<K> {
    (0..n)
        .map(|row| {
            let key = cols.iter().zip(radices).fold(0u64, |k, (col, &radix)| {
                let code = col.codes[row];
                let digit = if code == NULL_CODE {
                    radix - 1
                } else {
                    u64::from(code)
                };
                k * radix + digit
            });
            narrow(key)
        })
        .collect()
}

/// Groups and counts by code in Polars, keeps the duplicate groups and, of
/// those, the ones that can be among the first `top` by count; decodes only
/// those to strings, and has Polars order them by count, then values.
/// `plan` chooses the key (see [`KeyPlan`]).
fn analyze_slice(
    cols: &[&Encoded],
    n: usize,
    slice: &[Field],
    top: usize,
    plan: KeyPlan,
) -> PolarsResult<SliceReport> {
    let (frame, key_names) = match keys(cols, n, plan) {
        Keys::Packed32(keys) => (
            DataFrame::new(n, vec![Column::new("key".into(), keys)])?,
            vec!["key".to_string()],
        ),
        Keys::Packed(keys) => (
            DataFrame::new(n, vec![Column::new("key".into(), keys)])?,
            vec!["key".to_string()],
        ),
        Keys::PerField => {
            let names: Vec<String> = (0..cols.len()).map(|i| format!("code{i}")).collect();
            let code_cols = cols
                .iter()
                .zip(&names)
                .map(|(c, name)| {
                    let codes = c.codes.iter().map(|&x| (x != NULL_CODE).then_some(x));
                    UInt32Chunked::from_iter_options(name.as_str().into(), codes).into_column()
                })
                .collect();
            (DataFrame::new(n, code_cols)?, names)
        }
    };
    let by: Vec<Expr> = key_names.iter().map(|k| col(k.as_str())).collect();
    let grouped = frame
        .lazy()
        .group_by(by)
        .agg([len().alias(COUNT)])
        .collect()?;
    let groups = grouped.height() as u64;
    // Eager from here on: the frames are small, and a lazy query's planning
    // would cost more than the work.
    let counts = grouped.column(COUNT)?.as_materialized_series();
    let dups = grouped.filter(&counts.gt_eq(2)?)?;
    let duplicate_groups = dups.height() as u64;
    // Only groups counted at least as often as the `top`-th largest count can
    // be shown; the rest need neither decoding nor ordering by value.
    let dups = if dups.height() > top && top > 0 {
        let counts = dups.column(COUNT)?.as_materialized_series();
        let sorted = counts.sort(SortOptions::default().with_order_descending(true))?;
        let threshold = sorted.get(top - 1)?;
        dups.filter(&counts.gt_eq(threshold.extract::<IdxSize>().unwrap_or(0))?)?
    } else {
        dups
    };

    // Decode the shown candidates' keys into their field values.
    let mut values: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(dups.height()); cols.len()];
    if key_names.len() == 1 && key_names[0] == "key" {
        let radices: Vec<u64> = cols.iter().map(|c| c.distinct() as u64 + 1).collect();
        let keys = dups.column("key")?.cast(&DataType::UInt64)?;
        for key in keys.u64()?.into_no_null_iter() {
            let mut rest = key;
            for (i, (col, &radix)) in cols.iter().zip(&radices).enumerate().rev() {
                let digit = rest % radix;
                rest /= radix;
                let code = if digit == radix - 1 {
                    NULL_CODE
                } else {
                    digit as u32
                };
                values[i].push(col.decode(code));
            }
        }
    } else {
        for (i, (col, name)) in cols.iter().zip(&key_names).enumerate() {
            for code in dups.column(name)?.u32()?.iter() {
                values[i].push(col.decode(code.unwrap_or(NULL_CODE)));
            }
        }
    }
    let mut frame: Vec<Column> = slice
        .iter()
        .zip(&values)
        .map(|(f, v)| {
            StringChunked::from_iter_options(f.name().into(), v.iter().copied()).into_column()
        })
        .collect();
    frame.push(dups.column(COUNT)?.clone());
    let by: Vec<String> = std::iter::once(COUNT.to_string())
        .chain(slice.iter().map(|f| f.name().to_string()))
        .collect();
    let mut descending = vec![true];
    descending.extend(std::iter::repeat_n(false, slice.len()));
    let shown = DataFrame::new(dups.height(), frame)?.sort(
        by,
        SortMultipleOptions::default()
            .with_order_descending_multi(descending)
            .with_nulls_last(true)
            .with_maintain_order(false),
    )?;
    let shown = shown.head(Some(top));

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

/// `[analysis]`: the slices counted and the rows reported.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSettings {
    pub slices: Vec<Vec<Field>>,
    pub top: usize,
}

impl AnalysisSettings {
    pub fn check(&self, f: &mut crate::values::Findings) {
        if self.slices.is_empty() {
            f.add("analysis.slices", "at least one slice is needed");
        }
        for (i, slice) in self.slices.iter().enumerate() {
            let key = format!("analysis.slices[{i}]");
            let names: Vec<String> = slice.iter().map(|f| f.name().to_string()).collect();
            f.names(&key, &names, &Field::names());
            if slice.is_empty() {
                f.add(key, "a slice names at least one field");
            } else if self.slices[..i].contains(slice) {
                f.add(key, "the same slice is listed twice");
            }
        }
        f.bounded("analysis.top", self.top as u64, 1, crate::values::MAX_INT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{LoginEvent, FIELD_COUNT};
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
    fn every_key_plan_gives_the_same_report() {
        let events = vec![
            ev(Some("b"), Some("1")),
            ev(Some("a"), None),
            ev(Some("b"), Some("1")),
            ev(Some("a"), None),
            ev(None, None),
            ev(None, None),
            ev(Some("c"), Some("2")),
        ];
        let cols = Columns::from_events(&events);
        let slice = [Field::UserId, Field::Ip];
        let slices = [slice.to_vec()];
        let report = |plan| analyze_with(&cols, &slices, 10, plan).unwrap().remove(0);
        let narrowest = report(KeyPlan::Narrowest);
        assert_eq!(narrowest, report(KeyPlan::Packed64));
        assert_eq!(narrowest, report(KeyPlan::PerField));
        assert_eq!((narrowest.groups, narrowest.duplicate_groups), (4, 3));
        assert_eq!(narrowest.duplicates[2].values, vec![None, None]);
    }

    #[test]
    fn dictionary_equality_sees_a_difference_in_any_byte_of_any_length() {
        for n in 0..=80usize {
            let a = "x".repeat(n);
            assert!(same(&a, &a.clone()), "length {n}");
            for i in 0..n {
                let mut b = a.clone().into_bytes();
                b[i] = b'y';
                let b = String::from_utf8(b).unwrap();
                assert!(!same(&a, &b), "length {n}, byte {i} differs");
            }
            assert!(!same(&a, &format!("{a}x")), "lengths {n} and {}", n + 1);
        }
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
