//! The deployment examples under `examples/deploy/` use only commands and flags that exist: every
//! bootsync invocation in their YAML files and systemd units is checked against `--help`.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every string array in `value` whose first element is the bootsync binary.
fn invocations(value: &Value, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Array(items) => {
            let words: Option<Vec<String>> = items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect();
            if let Some(words) =
                words.filter(|w| w.first().is_some_and(|f| f.ends_with("bootsync")))
            {
                out.push(words);
            } else {
                items.iter().for_each(|i| invocations(i, out));
            }
        }
        Value::Object(map) => map.values().for_each(|v| invocations(v, out)),
        _ => {}
    }
}

/// The `ExecStart=` command of a systemd unit, continuation lines joined.
fn exec_start(unit: &str) -> Vec<Vec<String>> {
    let joined = unit.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Every `--flag` a subcommand's `--help` lists.
fn known_flags(command: &str, cache: &mut BTreeMap<String, Option<String>>) -> Option<String> {
    cache
        .entry(command.to_string())
        .or_insert_with(|| {
            let (code, out, _) = support::run_cli(&[command, "--help"], &deploy_dir());
            (code == 0).then_some(out)
        })
        .clone()
}

#[it::test]
fn every_bootsync_invocation_in_the_deploy_examples_uses_real_flags() {
    let mut all = Vec::new();
    files(&deploy_dir(), &mut all);
    let mut found: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for path in &all {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".service") {
            found.extend(exec_start(&text).into_iter().map(|c| (path.clone(), c)));
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            // Multi-document YAML (Kubernetes manifests) is split on `---` lines.
            for document in text.split("\n---\n") {
                let value: Value = serde_saphyr::from_str(document)
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                let mut commands = Vec::new();
                invocations(&value, &mut commands);
                found.extend(commands.into_iter().map(|c| (path.clone(), c)));
            }
        }
    }
    // Each layout has its commands: the check below cannot pass by finding nothing.
    for layout in ["systemd", "kubernetes", "etcd-replicas"] {
        assert!(
            found
                .iter()
                .any(|(p, _)| p.starts_with(deploy_dir().join(layout))),
            "no bootsync invocation found under examples/deploy/{layout}"
        );
    }
    let mut help = BTreeMap::new();
    let mut problems = Vec::new();
    for (path, words) in &found {
        let Some(command) = words.get(1) else {
            problems.push(format!("{}: bootsync without a command", path.display()));
            continue;
        };
        let Some(text) = known_flags(command, &mut help) else {
            problems.push(format!(
                "{}: no such command `bootsync {command}`",
                path.display()
            ));
            continue;
        };
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            let listed = text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|w| w == flag);
            if !listed {
                problems.push(format!(
                    "{}: `bootsync {command}` has no flag {flag}",
                    path.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(found.len() >= 8, "{found:#?}");
}

#[it::test]
fn the_completion_scripts_name_the_commands_and_bash_accepts_its_script() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = support::run_cli(&["completions", shell], &deploy_dir());
        assert_eq!(code, 0, "{err}");
        for word in ["serve", "client", "status", "holder-id"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (_, script, _) = support::run_cli(&["completions", "bash"], &deploy_dir());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootsync.bash");
    std::fs::write(&path, script).unwrap();
    // bash is on every machine this project builds on (CI itself is a bash script).
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "bash -n rejects the script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, err) = support::run_cli(&["completions", "tcsh"], &deploy_dir());
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
}
