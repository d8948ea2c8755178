//! Property tests: every parser of peer input answers arbitrary bytes with a
//! value or an error, never a panic, and encodings round-trip.

use std::collections::BTreeMap;

use otter_proto::api::Target;
use otter_proto::deployment::{self, Outcome, Phase};
use otter_proto::manifest::{Manifest, parse_release_id};
use otter_proto::messages::{
    DeviceEvent, Mode, PollResponse, PushAck, Registration, ServerMessage, StatusReport, decode,
    encode,
};
use otter_proto::push::PushChunk;
use otter_proto::topics::{DeviceId, parse_device_topic};
use proptest::prelude::*;

const EVENTS: [DeviceEvent; 6] = [
    DeviceEvent::Received,
    DeviceEvent::Downloaded,
    DeviceEvent::Installing,
    DeviceEvent::Installed,
    DeviceEvent::Failed,
    DeviceEvent::RolledBack,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode::<Registration>(&bytes);
        let _ = decode::<StatusReport>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
        let _ = decode::<PushAck>(&bytes);
        let _ = decode::<PollResponse>(&bytes);
        let _ = PushChunk::decode(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let _ = Manifest::from_json(&text);
        let _ = DeviceId::parse(&text);
        let _ = parse_device_topic(&text);
        let _ = Target::parse(&text);
        let _ = parse_release_id(&text);
    }

    #[test]
    fn device_ids_are_safe_topic_segments(text in "\\PC{0,80}") {
        if let Ok(id) = DeviceId::parse(&text) {
            prop_assert!(!id.as_str().contains(['/', '+', '#']));
            prop_assert!(id.as_str().len() <= 64);
        }
    }

    #[test]
    fn chunks_round_trip(
        id in "[a-z0-9-]{0,64}",
        offset in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let chunk = PushChunk { deployment_id: &id, offset, data: &data };
        let bytes = chunk.encode();
        prop_assert_eq!(PushChunk::decode(&bytes), Ok(chunk));
    }

    #[test]
    fn registrations_round_trip(
        hardware in "[a-zA-Z0-9_-]{1,20}",
        installed in proptest::collection::btree_map(
            "[a-z][a-z0-9-]{0,15}",
            (0u64..100, 0u64..100, 0u64..100),
            0..5,
        ),
        mode in prop_oneof![Just(Mode::Push), Just(Mode::Pull), Just(Mode::PushPull)],
    ) {
        let installed: BTreeMap<String, semver::Version> = installed
            .into_iter()
            .map(|(name, (a, b, c))| (name, semver::Version::new(a, b, c)))
            .collect();
        let registration = Registration {
            protocol: otter_proto::PROTOCOL_VERSION,
            hardware,
            installed,
            agent_version: "1.0.0".into(),
            mode,
            capabilities: vec!["file".into()],
            encryption_key: None,
        };
        prop_assert_eq!(decode::<Registration>(&encode(&registration)), Ok(registration));
    }

    /// Whatever order reports arrive in, duplicated or stale, a device's
    /// phase only moves forward and a terminal phase is final.
    #[test]
    fn phases_only_move_forward(events in proptest::collection::vec(0usize..EVENTS.len(), 0..24)) {
        let mut phase = deployment::notified(Phase::Pending);
        for index in events {
            match deployment::apply(phase, EVENTS[index]) {
                Outcome::Advanced { to, .. } => {
                    prop_assert!(!phase.is_terminal());
                    prop_assert!(to > phase || to.is_terminal(), "{:?} -> {:?}", phase, to);
                    phase = to;
                }
                Outcome::Ignored(_) => {}
            }
        }
    }
}
