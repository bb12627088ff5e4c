//! Duplicate counting with Polars.
//!
//! For each slice (a list of fields) the batch is grouped by those fields and
//! the rows of each group counted. A duplicate is a group counted at least
//! twice. The report of a slice is exact: the number of groups, the number of
//! duplicate groups, and the first `top` duplicate groups ordered by count
//! descending, then key values ascending (byte order, nulls last), so the same
//! batch always gives the same report. A null value is a value of its own: it
//! groups with the other nulls of its field.
//!
//! Several batches can be analysed in one job ([`analyze_many`]), with the
//! batch as one more grouping key: each report equals that of the batch
//! analysed alone. A job has a fixed cost (threads started and joined, one
//! Polars query per slice) that small batches, such as a backlog of short
//! windows, would otherwise pay one by one.

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
    /// One dictionary over the rows of `parts`, one after the other: a value
    /// has the same code in every part.
    fn new(parts: &[&'a StrColumn]) -> Encoded<'a> {
        let hasher = foldhash::fast::RandomState::default();
        let rows: usize = parts.iter().map(|c| c.len()).sum();
        // Sized for every row being distinct: growing would re-hash every
        // value through the batch buffer, which costs more than the memory.
        let mut index: HashTable<u32> = HashTable::with_capacity(rows);
        let mut values: Vec<&'a str> = Vec::new();
        let codes = parts
            .iter()
            .flat_map(|col| col.iter())
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
fn encode_all<'a>(batches: &[&'a Columns], slices: &[Vec<Field>]) -> Vec<Option<Encoded<'a>>> {
    let mut used = [false; crate::core::event::FIELD_COUNT];
    for f in slices.iter().flatten() {
        used[f.index()] = true;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = Field::ALL
            .iter()
            .map(|f| {
                used[f.index()].then(|| {
                    scope.spawn(|| {
                        let parts: Vec<&StrColumn> = batches.iter().map(|c| c.column(*f)).collect();
                        Encoded::new(&parts)
                    })
                })
            })
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

/// Counts duplicates of every slice over each of `batches` in one job: the
/// reports at index `i` equal [`analyze`] of `batches[i]` alone. Rows are
/// grouped by batch and slice values together, so the job's fixed cost is
/// paid once for all the batches.
pub fn analyze_many(
    batches: &[&Columns],
    slices: &[Vec<Field>],
    top: usize,
) -> PolarsResult<Vec<Vec<SliceReport>>> {
    analyze_many_with(batches, slices, top, KeyPlan::Narrowest)
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
    let mut reports = analyze_many_with(&[columns], slices, top, plan)?;
    Ok(reports.pop().expect("one list of reports per batch"))
}

/// [`analyze_many`] with the rows keyed as `plan` says.
#[doc(hidden)]
pub fn analyze_many_with(
    batches: &[&Columns],
    slices: &[Vec<Field>],
    top: usize,
    plan: KeyPlan,
) -> PolarsResult<Vec<Vec<SliceReport>>> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    // Where each batch's rows start in the encoded columns, then the end.
    let starts: Vec<usize> = std::iter::once(0)
        .chain(batches.iter().scan(0, |end, b| {
            *end += b.len();
            Some(*end)
        }))
        .collect();
    let encoded = encode_all(batches, slices);
    let run = |slice: &Vec<Field>| {
        let cols: Vec<&Encoded> = slice
            .iter()
            .map(|f| {
                encoded[f.index()]
                    .as_ref()
                    .expect("used fields are encoded")
            })
            .collect();
        analyze_slice(&cols, &starts, slice, top, plan)
    };
    let half = slices.len().div_ceil(2);
    let (first, second) = slices.split_at(half);
    let (a, b) = std::thread::scope(|scope| {
        let h = scope.spawn(|| second.iter().map(run).collect::<Vec<_>>());
        let a: Vec<_> = first.iter().map(run).collect();
        (a, h.join().expect("analysis does not panic"))
    });
    // Per slice, one report per batch; the caller wants them per batch.
    let mut out: Vec<Vec<SliceReport>> = (0..batches.len())
        .map(|_| Vec::with_capacity(slices.len()))
        .collect();
    for per_batch in a.into_iter().chain(b) {
        for (reports, report) in out.iter_mut().zip(per_batch?) {
            reports.push(report);
        }
    }
    Ok(out)
}

/// Name of the batch column when the codes are grouped one column per
/// field; no event field has this name.
const BATCH: &str = "batch";

/// How the rows of a slice are keyed for grouping. A row's batch is part of
/// its key: the most significant digit of a packed key, or a column of its
/// own.
enum Keys {
    /// One exact u64 per row: the batch, then the fields' codes, as digits of
    /// a mixed-radix number (the batch's radix is the number of batches; a
    /// field's is its distinct values + 1, the last digit value for null).
    Packed(Vec<u64>),
    /// The same, when every key fits in 32 bits: Polars groups 32-bit keys
    /// about twice as fast when there are few groups.
    Packed32(Vec<u32>),
    /// One nullable u32 code column per field, and the batch's index when
    /// there are several, when the packed key would not fit in 64 bits.
    PerField,
}

/// The radix of each field's digit in a packed key.
fn radices(cols: &[&Encoded]) -> Vec<u64> {
    cols.iter().map(|c| c.distinct() as u64 + 1).collect()
}

fn keys(cols: &[&Encoded], starts: &[usize], plan: KeyPlan) -> Keys {
    let radices = radices(cols);
    let batches = (starts.len() - 1) as u64;
    // The largest packed key, when it fits in 64 bits.
    let max_key = radices
        .iter()
        .try_fold(batches, |acc, r| acc.checked_mul(*r))
        .map(|span| span - 1);
    match (plan, max_key) {
        (KeyPlan::Narrowest, Some(k)) if k <= u64::from(u32::MAX) => {
            Keys::Packed32(pack(cols, &radices, starts, |k| k as u32))
        }
        (KeyPlan::Narrowest | KeyPlan::Packed64, Some(_)) => {
            Keys::Packed(pack(cols, &radices, starts, |k| k))
        }
        _ => Keys::PerField,
    }
}

/// The packed key of every row, batch by batch, narrowed by `narrow` (exact:
/// the caller checked that every key fits).
fn pack<K: Copy>(
    cols: &[&Encoded],
    radices: &[u64],
    starts: &[usize],
    narrow: fn(u64) -> K,
) -> Vec<K> {
    let mut keys = Vec::with_capacity(starts[starts.len() - 1]);
    for (batch, rows) in starts.windows(2).enumerate() {
        keys.extend((rows[0]..rows[1]).map(|row| {
            let key = cols
                .iter()
                .zip(radices)
                .fold(batch as u64, |k, (col, &radix)| {
                    let code = col.codes[row];
                    let digit = if code == NULL_CODE {
                        radix - 1
                    } else {
                        u64::from(code)
                    };
                    k * radix + digit
                });
            narrow(key)
        }));
    }
    keys
}

/// How the groups of a slice are keyed, once grouped.
enum Grouped {
    /// By packed key: the key column holds batch and codes.
    Packed,
    /// One code column per field, after a batch column when `batched`.
    PerField { batched: bool },
}

/// Groups and counts by batch and code in Polars, keeps each batch's
/// duplicate groups and, of those, the ones that can be among its first
/// `top` by count; decodes only those to strings, and has Polars order them
/// by batch, count, then values. `plan` chooses the key (see [`KeyPlan`]).
/// Returns one report per batch.
fn analyze_slice(
    cols: &[&Encoded],
    starts: &[usize],
    slice: &[Field],
    top: usize,
    plan: KeyPlan,
) -> PolarsResult<Vec<SliceReport>> {
    let batches = starts.len() - 1;
    let n = starts[batches];
    let (frame, key_names, how) = match keys(cols, starts, plan) {
        Keys::Packed32(keys) => (
            DataFrame::new(n, vec![Column::new("key".into(), keys)])?,
            vec!["key".to_string()],
            Grouped::Packed,
        ),
        Keys::Packed(keys) => (
            DataFrame::new(n, vec![Column::new("key".into(), keys)])?,
            vec!["key".to_string()],
            Grouped::Packed,
        ),
        Keys::PerField => {
            let batched = batches > 1;
            let mut names: Vec<String> = Vec::with_capacity(cols.len() + 1);
            let mut columns: Vec<Column> = Vec::with_capacity(cols.len() + 1);
            if batched {
                let batch: Vec<u32> = starts
                    .windows(2)
                    .enumerate()
                    .flat_map(|(b, rows)| std::iter::repeat_n(b as u32, rows[1] - rows[0]))
                    .collect();
                columns.push(Column::new(BATCH.into(), batch));
                names.push(BATCH.to_string());
            }
            for (i, c) in cols.iter().enumerate() {
                let name = format!("code{i}");
                let codes = c.codes.iter().map(|&x| (x != NULL_CODE).then_some(x));
                columns.push(
                    UInt32Chunked::from_iter_options(name.as_str().into(), codes).into_column(),
                );
                names.push(name);
            }
            (
                DataFrame::new(n, columns)?,
                names,
                Grouped::PerField { batched },
            )
        }
    };
    let by: Vec<Expr> = key_names.iter().map(|k| col(k.as_str())).collect();
    let grouped = frame
        .lazy()
        .group_by(by)
        .agg([len().alias(COUNT)])
        .collect()?;
    // Eager from here on: the frames are small, and a lazy query's planning
    // would cost more than the work.
    let counts = grouped.column(COUNT)?.cast(&DataType::UInt64)?;
    let counts: Vec<u64> = counts.u64()?.into_no_null_iter().collect();
    let radices = radices(cols);
    // A field key's span: the batch digit's weight in a packed key. Only a
    // packed key uses it, and then it fits in 64 bits; the per-field key is
    // chosen because it may not.
    let span: u64 = radices
        .iter()
        .try_fold(1u64, |acc, r| acc.checked_mul(*r))
        .unwrap_or(u64::MAX);
    let (packed, group_batch): (Vec<u64>, Vec<u32>) = match how {
        Grouped::Packed => {
            let keys = grouped.column("key")?.cast(&DataType::UInt64)?;
            let keys: Vec<u64> = keys.u64()?.into_no_null_iter().collect();
            let batch = keys.iter().map(|k| (k / span) as u32).collect();
            (keys, batch)
        }
        Grouped::PerField { batched: true } => (
            Vec::new(),
            grouped.column(BATCH)?.u32()?.into_no_null_iter().collect(),
        ),
        Grouped::PerField { batched: false } => (Vec::new(), vec![0; grouped.height()]),
    };

    let mut reports: Vec<SliceReport> = (0..batches)
        .map(|_| SliceReport {
            fields: slice.to_vec(),
            groups: 0,
            duplicate_groups: 0,
            duplicates: Vec::new(),
        })
        .collect();
    let mut dup_counts: Vec<Vec<u64>> = vec![Vec::new(); batches];
    for (&b, &count) in group_batch.iter().zip(&counts) {
        let report = &mut reports[b as usize];
        report.groups += 1;
        if count >= 2 {
            report.duplicate_groups += 1;
            dup_counts[b as usize].push(count);
        }
    }
    // Only groups counted at least as often as their batch's `top`-th largest
    // count can be shown; the rest need neither decoding nor ordering by value.
    let threshold: Vec<u64> = dup_counts
        .into_iter()
        .map(|mut c| {
            if top > 0 && c.len() > top {
                *c.select_nth_unstable_by(top - 1, |a, b| b.cmp(a)).1
            } else {
                2
            }
        })
        .collect();
    let candidates: Vec<usize> = (0..counts.len())
        .filter(|&g| counts[g] >= threshold[group_batch[g] as usize])
        .collect();

    // Decode the candidates' keys into their field values.
    let mut values: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(candidates.len()); cols.len()];
    match how {
        Grouped::Packed => {
            for &g in &candidates {
                let mut rest = packed[g] % span;
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
        }
        Grouped::PerField { batched } => {
            let names = &key_names[usize::from(batched)..];
            for (i, (col, name)) in cols.iter().zip(names).enumerate() {
                let codes: Vec<Option<u32>> = grouped.column(name)?.u32()?.iter().collect();
                for &g in &candidates {
                    values[i].push(col.decode(codes[g].unwrap_or(NULL_CODE)));
                }
            }
        }
    }
    let mut frame: Vec<Column> = Vec::with_capacity(slice.len() + 2);
    frame.push(Column::new(
        BATCH.into(),
        candidates
            .iter()
            .map(|&g| group_batch[g])
            .collect::<Vec<u32>>(),
    ));
    frame.extend(slice.iter().zip(&values).map(|(f, v)| {
        StringChunked::from_iter_options(f.name().into(), v.iter().copied()).into_column()
    }));
    frame.push(Column::new(
        COUNT.into(),
        candidates.iter().map(|&g| counts[g]).collect::<Vec<u64>>(),
    ));
    let by: Vec<String> = [BATCH, COUNT]
        .into_iter()
        .map(str::to_string)
        .chain(slice.iter().map(|f| f.name().to_string()))
        .collect();
    let mut descending = vec![false, true];
    descending.extend(std::iter::repeat_n(false, slice.len()));
    let shown = DataFrame::new(candidates.len(), frame)?.sort(
        by,
        SortMultipleOptions::default()
            .with_order_descending_multi(descending)
            .with_nulls_last(true)
            .with_maintain_order(false),
    )?;

    let batch_of = shown.column(BATCH)?.u32()?;
    let counts = shown.column(COUNT)?.u64()?;
    let key_cols: Vec<&StringChunked> = slice
        .iter()
        .map(|f| shown.column(f.name()).and_then(|c| c.str()))
        .collect::<PolarsResult<_>>()?;
    for i in 0..shown.height() {
        let report = &mut reports[batch_of.get(i).unwrap_or(0) as usize];
        if report.duplicates.len() < top {
            report.duplicates.push(DuplicateRow {
                values: key_cols
                    .iter()
                    .map(|c| c.get(i).map(str::to_owned))
                    .collect(),
                count: counts.get(i).unwrap_or(0),
            });
        }
    }
    Ok(reports)
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
    fn batches_in_one_job_report_as_each_alone() {
        let a = Columns::from_events(&[
            ev(Some("a"), Some("1")),
            ev(Some("a"), Some("1")),
            ev(Some("b"), None),
        ]);
        let b = Columns::from_events(&[
            ev(Some("a"), Some("1")),
            ev(Some("b"), None),
            ev(Some("b"), None),
            ev(Some("c"), Some("2")),
        ]);
        let empty = Columns::default();
        let slices = vec![vec![Field::UserId, Field::Ip], vec![Field::Ip]];
        let alone: Vec<_> = [&a, &empty, &b]
            .iter()
            .map(|c| analyze(c, &slices, 1).unwrap())
            .collect();
        for plan in [KeyPlan::Narrowest, KeyPlan::Packed64, KeyPlan::PerField] {
            let together = analyze_many_with(&[&a, &empty, &b], &slices, 1, plan).unwrap();
            assert_eq!(together, alone, "{plan:?}");
        }
        // ("a", "1") is counted twice in the first batch, once in the last.
        assert_eq!(alone[0][0].duplicates[0].count, 2);
        assert_eq!(alone[2][0].duplicate_groups, 1);
        assert_eq!(
            alone[2][0].duplicates[0].values,
            vec![Some("b".into()), None]
        );
        assert!(analyze_many(&[], &slices, 1).unwrap().is_empty());
    }

    #[test]
    fn keys_too_wide_for_64_bits_are_grouped_per_field() {
        // Four fields of 70,000 distinct values each: 70,001^4 passes 2^64,
        // so the rows are keyed one column per field, and nothing on the
        // way computes the packed key's span without checking it.
        let values: Vec<String> = (0..70_000).map(|i| format!("v{i}")).collect();
        let slice = vec![Field::UserId, Field::Ip, Field::DeviceId, Field::Locale];
        let events: Vec<LoginEvent> = values
            .iter()
            .chain(values.iter().take(3))
            .map(|v| {
                let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
                for f in &slice {
                    fields[f.index()] = Some(Cow::Borrowed(v.as_str()));
                }
                LoginEvent {
                    fields,
                    timestamp_ms: Some(0),
                }
            })
            .collect();
        let cols = Columns::from_events(&events);
        let report = &analyze(&cols, std::slice::from_ref(&slice), 2).unwrap()[0];
        assert_eq!((report.groups, report.duplicate_groups), (70_000, 3));
        let rows: Vec<_> = report
            .duplicates
            .iter()
            .map(|r| (r.values[0].clone(), r.count))
            .collect();
        assert_eq!(
            rows,
            vec![(Some("v0".to_string()), 2), (Some("v1".to_string()), 2)]
        );
    }

    #[test]
    fn an_empty_batch_has_no_groups() {
        let r = analyze(&Columns::default(), &[vec![Field::Ip]], 10).unwrap();
        assert_eq!((r[0].groups, r[0].duplicate_groups), (0, 0));
    }
}
