//! Property: for random batches, the Polars duplicate counts equal a naive
//! HashMap count, for every slice shape.

use std::borrow::Cow;

use login_metrics::core::analysis::{
    analyze, analyze_many, analyze_many_with, analyze_with, KeyPlan,
};
use login_metrics::core::event::{Field, LoginEvent, FIELD_COUNT};
use login_metrics::work::Columns;
use proptest::prelude::*;

/// Values drawn from tiny pools so that duplicates are common; None is null.
/// Some share a long prefix and differ only at the end, in lengths from 5 to
/// 72 bytes, so equal-length values that differ in any word are compared.
fn field_value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        6 => "[a-c]{0,2}".prop_map(Some),
        3 => (proptest::sample::select(vec![3usize, 6, 7, 14, 34, 70]), "[a-c]{2}")
            .prop_map(|(pad, end)| Some(format!("{}{end}", "p".repeat(pad)))),
    ]
}

fn event() -> impl Strategy<Value = Vec<Option<String>>> {
    proptest::collection::vec(field_value(), FIELD_COUNT)
}

fn slice() -> impl Strategy<Value = Vec<Field>> {
    proptest::sample::subsequence(Field::ALL.to_vec(), 1..=3).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn polars_counts_equal_a_naive_count(
        rows in proptest::collection::vec(event(), 0..300),
        slices in proptest::collection::vec(slice(), 1..4),
        top in 1usize..8,
    ) {
        let columns = columns_of(&rows);
        let reports = analyze(&columns, &slices, top).unwrap();
        // The other groupings (64-bit keys, one code column per field) must agree too.
        for plan in [KeyPlan::Packed64, KeyPlan::PerField] {
            prop_assert_eq!(&analyze_with(&columns, &slices, top, plan).unwrap(), &reports);
        }
        for (slice, report) in slices.iter().zip(&reports) {
            let (groups, dup_groups, mut rows_expected) =
                crate::common::naive_report(rows.iter().map(|r| slice.iter().map(|f| r[f.index()].clone()).collect()));
            rows_expected.truncate(top);
            prop_assert_eq!(report.groups, groups);
            prop_assert_eq!(report.duplicate_groups, dup_groups);
            let got: Vec<_> = report.duplicates.iter().map(|d| (d.values.clone(), d.count)).collect();
            prop_assert_eq!(got, rows_expected);
        }
    }
}

/// The columns of events whose fields are `rows`' values, in field order.
fn columns_of(rows: &[Vec<Option<String>>]) -> Columns {
    let events: Vec<LoginEvent> = rows
        .iter()
        .map(|r| {
            let mut fields: [Option<Cow<str>>; FIELD_COUNT] = Default::default();
            for (i, v) in r.iter().enumerate() {
                fields[i] = v.as_deref().map(Cow::Borrowed);
            }
            LoginEvent {
                fields,
                timestamp_ms: Some(0),
            }
        })
        .collect();
    Columns::from_events(&events)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Several batches analysed in one job (the batch as a grouping key, one
    /// dictionary over all of them) report exactly what each batch does alone,
    /// whatever the key plan, and what a naive count of each batch says.
    #[test]
    fn batches_analysed_together_equal_each_alone(
        batches in proptest::collection::vec(proptest::collection::vec(event(), 0..120), 0..6),
        slices in proptest::collection::vec(slice(), 1..4),
        top in 1usize..8,
    ) {
        let columns: Vec<Columns> = batches.iter().map(|rows| columns_of(rows)).collect();
        let refs: Vec<&Columns> = columns.iter().collect();
        let alone: Vec<_> = columns.iter().map(|c| analyze(c, &slices, top).unwrap()).collect();
        prop_assert_eq!(&analyze_many(&refs, &slices, top).unwrap(), &alone);
        for plan in [KeyPlan::Packed64, KeyPlan::PerField] {
            prop_assert_eq!(&analyze_many_with(&refs, &slices, top, plan).unwrap(), &alone);
        }
        for (rows, reports) in batches.iter().zip(&alone) {
            for (slice, report) in slices.iter().zip(reports) {
                let (groups, dup_groups, mut expected) = crate::common::naive_report(
                    rows.iter().map(|r| slice.iter().map(|f| r[f.index()].clone()).collect()),
                );
                expected.truncate(top);
                prop_assert_eq!(report.groups, groups);
                prop_assert_eq!(report.duplicate_groups, dup_groups);
                let got: Vec<_> = report.duplicates.iter().map(|d| (d.values.clone(), d.count)).collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
