//! The open-files limit of this process. Every simulated device holds one or
//! two sockets, so the soft limit is raised to the hard limit first thing
//! (`rlimit`, no unsafe code here); a fleet that still does not fit is
//! refused with a clear error rather than failing connection by connection.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and answers the soft
/// limit now in force (1024, the usual default, if it cannot be read).
pub fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _hard)| soft)
                .unwrap_or(1024)
        }
    }
}
