//! Exponential backoff with jitter, shared by the MQTT reconnect loop, the
//! download retries and the safe-state probe.
//!
//! Each delay doubles from `initial` up to `max`; the delay returned is drawn
//! uniformly from its upper half, so a fleet that lost its server at the same
//! moment does not come back at the same moment.

use std::time::Duration;

/// Successive delays of one retry sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the following one is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let floor = ceiling / 2;
        if ceiling <= floor {
            return ceiling;
        }
        rand::random_range(floor..=ceiling)
    }

    /// Starts over from `initial`, after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// I/O errors that resolve themselves once load drops (out of file
/// descriptors or memory, an interrupted call): worth retrying.
pub fn is_transient_io(error: &std::io::Error) -> bool {
    const EINTR: i32 = 4;
    const EAGAIN: i32 = 11;
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(
        error.raw_os_error(),
        Some(EINTR | EAGAIN | ENOMEM | ENFILE | EMFILE)
    ) || error.kind() == std::io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_resource_shortages_are_transient() {
        for errno in [4, 11, 12, 23, 24] {
            assert!(
                is_transient_io(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // EACCES, ENOENT, ENOSPC, EROFS: retrying changes nothing.
        for errno in [13, 2, 28, 30] {
            assert!(
                !is_transient_io(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_transient_io(&std::io::Error::other("x")));
    }

    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            let delay = backoff.next_delay();
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{delay:?} {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
