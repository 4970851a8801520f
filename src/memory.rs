//! The memory a process may use, as its cgroup says, so that default budgets fit the
//! container they run in (a 128 MiB pod must not default to a 256 MiB budget).

use std::path::Path;

/// The memory limit that binds this process in bytes, if one is set: the smallest cgroup v2
/// `memory.max` (else v1 `memory.limit_in_bytes`) on its group or a group above it, as far up
/// as the process can see (a private cgroup namespace hides the groups above its root).
pub fn limit() -> Option<u64> {
    limit_under(
        Path::new("/sys/fs/cgroup"),
        &std::fs::read_to_string("/proc/self/cgroup").ok()?,
    )
}

/// The limit read under a cgroup mount `root`, for the membership lines of `/proc/self/cgroup`:
/// the smallest set on the process's group or any group above it, since a limit on a parent
/// (a systemd slice, a pod) binds every group beneath it.
fn limit_under(root: &Path, membership: &str) -> Option<u64> {
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (mount, file) = if controllers.is_empty() {
            // cgroup v2: one unified hierarchy.
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let group = mount.join(path.trim_start_matches('/'));
        // From the process's group up to the mount, never above it.
        let limit = group
            .ancestors()
            .take_while(|dir| dir.starts_with(&mount))
            .filter_map(|dir| read_limit(&dir.join(file)))
            .min();
        if limit.is_some() {
            return limit;
        }
    }
    None
}

fn read_limit(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: u64 = text.trim().parse().ok()?;
    // v1 writes "no limit" as a page-rounded i64::MAX.
    (value < 1 << 60).then_some(value)
}

/// `default`, or `1/divisor` of the memory limit when that is smaller.
pub fn share(default: usize, divisor: u64) -> usize {
    match limit() {
        Some(limit) => default.min(usize::try_from(limit / divisor).unwrap_or(usize::MAX)),
        None => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup tree under a temporary root with `file` (beneath `group`) holding `value`.
    fn tree(group: &str, file: &str, value: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(group)).unwrap();
        std::fs::write(root.path().join(group).join(file), value).unwrap();
        root
    }

    #[test]
    fn a_v2_limit_is_read_and_max_means_none() {
        let membership = "0::/kubepods/pod1\n";
        let limited = tree("kubepods/pod1", "memory.max", "134217728\n");
        assert_eq!(limit_under(limited.path(), membership), Some(128 << 20));
        let unlimited = tree("kubepods/pod1", "memory.max", "max\n");
        assert_eq!(limit_under(unlimited.path(), membership), None);
    }

    #[test]
    fn a_v1_limit_is_read_from_the_memory_controller() {
        let membership = "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n";
        let (group, file) = ("memory/docker/abc", "memory.limit_in_bytes");
        let limited = tree(group, file, "268435456");
        assert_eq!(limit_under(limited.path(), membership), Some(256 << 20));
        let unlimited = tree(group, file, "9223372036854771712");
        assert_eq!(limit_under(unlimited.path(), membership), None);
    }

    #[test]
    fn a_limit_on_a_parent_group_binds_the_groups_beneath_it() {
        let membership = "0::/system.slice/app.service\n";
        let root = tree("system.slice/app.service", "memory.max", "max\n");
        std::fs::write(root.path().join("system.slice/memory.max"), "268435456\n").unwrap();
        assert_eq!(limit_under(root.path(), membership), Some(256 << 20));
        // The smaller one wins, wherever it is set.
        std::fs::write(
            root.path().join("system.slice/app.service/memory.max"),
            "134217728\n",
        )
        .unwrap();
        assert_eq!(limit_under(root.path(), membership), Some(128 << 20));
    }
}
