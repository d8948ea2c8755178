//! Release data keys at rest (`otter_server::vault`): the database holds
//! them sealed under `data-key.secret`, never in clear; rows written in
//! clear by an older server are sealed at start, once.

mod engine_support;

use otter_server::audit::Actor;
use otter_server::store::Store;
use otter_server::vault::{KeyVault, VaultError};

use engine_support::{stub_data_key, stub_release, test_vault};

#[tokio::test]
async fn keys_stored_in_clear_are_sealed_once_and_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    // A release as an older server stored it: the key in clear.
    let mut legacy = stub_release(&otter_server::clock::now_rfc3339());
    legacy.data_key = stub_data_key().to_base64();
    store
        .insert_release(&legacy, &Actor::operator("admin"))
        .await
        .unwrap();

    let vault = test_vault();
    assert_eq!(store.seal_plaintext_data_keys(&vault).await.unwrap(), 1);
    let stored = store.release("app@1.0.0").await.unwrap().unwrap();
    assert!(stored.data_key.starts_with("v1:"), "{}", stored.data_key);
    assert!(!stored.data_key.contains(&stub_data_key().to_base64()));
    assert_eq!(
        vault
            .open("app@1.0.0", &stored.data_key)
            .unwrap()
            .as_bytes(),
        stub_data_key().as_bytes()
    );
    // Another server's secret does not open it.
    assert!(matches!(
        KeyVault::from_secret([1; 32]).open("app@1.0.0", &stored.data_key),
        Err(VaultError::WrongKey { .. })
    ));
    // Nothing left to seal: the sealed row is not sealed twice.
    assert_eq!(store.seal_plaintext_data_keys(&vault).await.unwrap(), 0);
    let again = store.release("app@1.0.0").await.unwrap().unwrap();
    assert_eq!(again.data_key, stored.data_key);
}

#[tokio::test]
async fn a_corrupt_key_in_clear_stops_the_sealing_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("otter.db"))
        .await
        .unwrap();
    let mut broken = stub_release(&otter_server::clock::now_rfc3339());
    broken.data_key = "not a key".to_owned();
    store
        .insert_release(&broken, &Actor::operator("admin"))
        .await
        .unwrap();
    assert!(store.seal_plaintext_data_keys(&test_vault()).await.is_err());
    let stored = store.release("app@1.0.0").await.unwrap().unwrap();
    assert_eq!(stored.data_key, "not a key");
}
