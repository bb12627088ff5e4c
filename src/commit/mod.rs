//! The commit path: the ledger that commits input offsets in order once
//! delivery acknowledges the work ([`ledger`]), after storing window mode's
//! per-partition checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod ledger;
