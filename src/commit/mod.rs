//! The commit path: the ledger that commits input offsets in order once
//! delivery acknowledges the work ([`ledger`]), after storing window mode's
//! per-partition checkpoints ([`checkpoint`]) — or, exactly once, commits
//! them in one transaction with delivery's records — and the metrics log's
//! recovery after a crash between a transaction's commit and its append
//! ([`recovery`]).

pub mod checkpoint;
pub mod ledger;
pub mod recovery;
