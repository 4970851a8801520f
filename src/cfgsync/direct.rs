//! Writes straight into `__cfgsync__` through `/v1`: checked as the server would check the
//! same things arriving through their own routes, so nothing it serves from can be broken by
//! a raw write.

use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::policy::Policy;
use super::report::Report;
use super::rollout::{Previous, RolloutRecord};
use super::state::{
    ADMISSION, BUNDLE, FETCHED, Fetched, Ledger, POLICY, PREVIOUS, REGISTRATION, REPORT, ROLLOUT,
    RegistrationRecord, WAVE, ledger_key, metadata_bytes,
};
use crate::api::cfgsync::MAX_METADATA_BYTES;
use crate::store::{Batch, CFGSYNC_NAMESPACE, Key, Op};

/// Checks a batch written straight into the store (through `/v1`) as the server would check
/// the same things loaded from files, and guards what it bypasses: a bundle or policy is
/// validated whole, a registration must decode, name its own key and keep its metadata within
/// the limit, and the ledger is the server's alone. A batch that touches registrations also
/// marks the ledger stale in the same commit, so caps keep holding. Every problem is listed.
pub fn guard_direct_write(batch: Batch) -> Result<Batch, Vec<String>> {
    let mut problems = Vec::new();
    let mut touches_registrations = false;
    for op in &batch.ops {
        let key = op.key();
        if key.namespace != CFGSYNC_NAMESPACE {
            continue;
        }
        if key.kind == ADMISSION {
            problems.push(format!(
                "{key}: the admission ledger is kept by the server; write the registrations and it is counted afresh"
            ));
            continue;
        }
        touches_registrations |= key.kind == REGISTRATION;
        if let Op::Put { key, value } = op
            && let Err(mut found) = check_value(key, value)
        {
            problems.append(&mut found);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(if touches_registrations {
        batch.put(ledger_key(), Ledger::stale())
    } else {
        batch
    })
}

/// Checks one value bound for `__cfgsync__` (see [`guard_direct_write`]).
fn check_value(key: &Key, value: &Value) -> Result<(), Vec<String>> {
    fn decode<T: serde::de::DeserializeOwned>(key: &Key, value: &Value) -> Result<T, Vec<String>> {
        serde_json::from_value(value.clone()).map_err(|err| vec![format!("{key}: {err}")])
    }
    match key.kind.as_str() {
        // An install through a remote store (the reconciler of `bootsync run`) writes a
        // rollout's records in the version's own batch: they must decode as the server reads
        // them.
        ROLLOUT => {
            decode::<RolloutRecord>(key, value).and_then(|record| match record.plan.problems() {
                problems if problems.is_empty() => Ok(()),
                problems => Err(problems
                    .into_iter()
                    .map(|p| format!("{key}: {p}"))
                    .collect()),
            })
        }
        PREVIOUS => decode::<Previous>(key, value).map(|_| ()),
        WAVE if key.key.parse::<usize>().is_err() => {
            Err(vec![format!("{key}: a wave marker's key is its number")])
        }
        REPORT => decode::<Report>(key, value).map(|_| ()),
        FETCHED => decode::<Fetched>(key, value).map(|_| ()),
        BUNDLE => decode::<NodeArtifactsBundle>(key, value)?.validate(),
        POLICY => decode::<Policy>(key, value)?.compile().map(|_| ()),
        REGISTRATION => {
            let record: RegistrationRecord = decode(key, value)?;
            let mut problems = Vec::new();
            if record.identifier != key.key {
                problems.push(format!(
                    "{key}: the record names {:?}, not its own key",
                    record.identifier
                ));
            }
            let size = metadata_bytes(Some(&record.metadata));
            if size > MAX_METADATA_BYTES as u64 {
                problems.push(format!(
                    "{key}: metadata is {size} bytes, over the limit of {MAX_METADATA_BYTES}"
                ));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cfgsync::state::{
        policy_key, previous_key, registration_key, report_key, rollout_key, wave_key,
    };

    fn record(id: &str, metadata: Value) -> Value {
        json!({"identifier": id, "ip": "10.0.0.1", "metadata": metadata,
               "first_seen_ms": 1, "last_seen_ms": 1})
    }

    #[test]
    fn a_direct_registration_write_marks_the_ledger_stale_in_the_same_batch() {
        let batch = Batch::new().put(registration_key("a"), record("a", json!({})));
        let guarded = guard_direct_write(batch).unwrap();
        let ledger = guarded.ops.iter().find(|op| op.key() == &ledger_key());
        assert!(
            matches!(ledger, Some(Op::Put { value, .. }) if value["stale"] == true),
            "{guarded:?}"
        );
        let unrelated = Batch::new().put(Key::new("prod", "cfg", "a"), json!(1));
        assert_eq!(guard_direct_write(unrelated).unwrap().ops.len(), 1);
    }

    #[test]
    fn the_ledger_cannot_be_written_or_deleted_directly() {
        for batch in [
            Batch::new().put(ledger_key(), json!({"registrations": 0})),
            Batch::new().delete(ledger_key()),
        ] {
            let problems = guard_direct_write(batch).unwrap_err();
            assert!(problems[0].contains("kept by the server"), "{problems:?}");
        }
    }

    #[test]
    fn a_rollout_s_records_and_reports_written_directly_must_decode() {
        for key in [rollout_key(), previous_key(), report_key("a")] {
            let batch = Batch::new().put(key.clone(), json!({"nonsense": true}));
            let problems = guard_direct_write(batch).unwrap_err();
            assert!(
                problems[0].starts_with(&key.to_string()),
                "{key}: {problems:?}"
            );
        }
        let bad_wave = Batch::new().put(Key::new(CFGSYNC_NAMESPACE, WAVE, "x"), json!({}));
        assert!(guard_direct_write(bad_wave).is_err());
        let record = RolloutRecord::new(
            crate::api::rollout::VersionKind::Policy,
            3,
            "d".into(),
            serde_json::from_value(json!({"waves": [1, "100%"]})).unwrap(),
            1,
        );
        let install = Batch::new()
            .put(rollout_key(), serde_json::to_value(&record).unwrap())
            .put(wave_key(1), json!({"started_ms": 1}))
            .delete(wave_key(2));
        assert!(
            guard_direct_write(install).is_ok(),
            "what an install writes passes"
        );
    }

    #[test]
    fn every_problem_of_a_direct_write_is_listed() {
        let big = json!({"blob": "x".repeat(MAX_METADATA_BYTES)});
        let batch = Batch::new()
            .put(registration_key("a"), record("b", json!({})))
            .put(registration_key("c"), record("c", big))
            .put(policy_key(), json!({"expect_nodes": 0}));
        let problems = guard_direct_write(batch).unwrap_err();
        for expected in ["names \"b\"", "over the limit", "at least 1"] {
            let listed = problems.iter().any(|p| p.contains(expected));
            assert!(listed, "{expected}: {problems:?}");
        }
    }
}
