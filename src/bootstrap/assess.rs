//! The convergence rule, written once: whether an initialiser is at its wanted flag, and whether
//! its params changed without a flag bump. The engine, `/v1/status`, the status page and `plan`
//! all ask this function.

/// What is known of one initialiser: what the spec wants and what the store holds.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The flag the spec wants.
    pub wanted_flag: &'a str,
    /// The hash of the params the spec gives.
    pub params_hash: &'a str,
    /// Whether it runs before the gate (it keeps no flag, so it is never behind).
    pub pre_gate: bool,
    /// The flag stored after its last success.
    pub stored_flag: Option<&'a str>,
    /// The params hash of its last success.
    pub succeeded_params_hash: Option<&'a str>,
}

/// Where one initialiser stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    /// At its wanted flag (or pre-gate): nothing to run.
    pub converged: bool,
    /// At its wanted flag, but the params differ from those it last succeeded with: the
    /// operator probably forgot to bump the flag.
    pub params_drift: bool,
}

impl Assessment {
    /// Whether a run is due.
    pub fn behind(&self) -> bool {
        !self.converged
    }
}

/// Assesses one initialiser.
pub fn assess(facts: Facts<'_>) -> Assessment {
    let at_flag = facts.stored_flag == Some(facts.wanted_flag);
    // A hash stored by an older release (another algorithm) says nothing either way; the
    // next success stores one that compares.
    let comparable = |hash: &&str| hash.starts_with(super::spec::PARAMS_HASH_PREFIX);
    Assessment {
        converged: facts.pre_gate || at_flag,
        params_drift: at_flag
            && facts
                .succeeded_params_hash
                .filter(comparable)
                .is_some_and(|hash| hash != facts.params_hash),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(stored: Option<&'a str>, hash: Option<&'a str>) -> Facts<'a> {
        Facts {
            wanted_flag: "v2",
            params_hash: "sha256:h2",
            pre_gate: false,
            stored_flag: stored,
            succeeded_params_hash: hash,
        }
    }

    #[test]
    fn only_the_stored_flag_decides_convergence() {
        assert!(assess(facts(Some("v2"), None)).converged);
        assert!(assess(facts(Some("v1"), Some("h2"))).behind());
        assert!(assess(facts(None, None)).behind());
        let pre_gate = Facts {
            pre_gate: true,
            ..facts(None, None)
        };
        assert!(assess(pre_gate).converged);
    }

    #[test]
    fn drift_is_changed_params_at_an_unchanged_flag() {
        assert!(assess(facts(Some("v2"), Some("sha256:h1"))).params_drift);
        assert!(!assess(facts(Some("v2"), Some("sha256:h2"))).params_drift);
        // Behind: the next run takes the new params anyway.
        assert!(!assess(facts(Some("v1"), Some("sha256:h1"))).params_drift);
        assert!(!assess(facts(Some("v2"), None)).params_drift);
        // An older release's hash (FNV-1a, no prefix) cannot be compared: no claim.
        assert!(!assess(facts(Some("v2"), Some("cbf29ce484222325"))).params_drift);
    }
}
