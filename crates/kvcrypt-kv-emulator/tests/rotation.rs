//! Key rotation policies (`GET`/`PUT /keys/{name}/rotationpolicy`) and automatic rotation on
//! the emulator's clock, which tests move forward through the admin interface.

use kvcrypt_kv_emulator::Op;
use kvcrypt_testkit::emulator::rest::{Api, admin_principal, client, inner_code, token};
use kvcrypt_testkit::emulator::{Kv, VAULT};
use serde_json::{Value, json};
use std::time::Duration;

const DAY: u64 = 86_400;

fn days(n: u64) -> Duration {
    Duration::from_secs(n * DAY)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn version_of(bundle: &Value) -> String {
    let kid = bundle["key"]["kid"].as_str().expect("kid");
    kid.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn rotation_policy_has_the_services_shape_rules_and_permissions() {
    let kv = Kv::start();
    let c = client(&kv.emu);
    let (_, t) = admin_principal(&c, &kv.emu).await;
    let vault = Api::new(&c, &kv.emu, &t, VAULT);
    kv.emu.create_key("kek", "RSA", Some(2048)).unwrap();
    let id = format!("https://{VAULT}:{}/keys/kek/rotationpolicy", kv.emu.port());

    // Never set: the service's default policy, without attributes.
    let (s, v) = vault.get("/keys/kek/rotationpolicy").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({
            "id": id,
            "lifetimeActions": [
                {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}
            ],
            "attributes": {},
        })
    );

    // Set one: the answer (and a later GET) is the policy with created/updated.
    let actions = json!([
        {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}},
        {"trigger": {"timeBeforeExpiry": "P10D"}, "action": {"type": "Notify"}},
    ]);
    let before = kv.emu.clock().now;
    let (s, v) = vault
        .put(
            "/keys/kek/rotationpolicy",
            json!({"lifetimeActions": actions, "attributes": {"expiryTime": "P90D"}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["lifetimeActions"], actions);
    assert_eq!(v["attributes"]["expiryTime"], "P90D");
    let created = v["attributes"]["created"].as_i64().unwrap();
    assert!(created >= before && created <= before + 5, "{v}");
    assert_eq!(v["attributes"]["updated"], created);
    let (s, got) = vault.get("/keys/kek/rotationpolicy").await;
    assert_eq!((s, &got), (200, &v));

    // The service's rules: 400 BadParameter.
    for (what, body) in [
        (
            "rotation under 7 days",
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P6D"}, "action": {"type": "Rotate"}}]}),
        ),
        (
            "expiry under 28 days",
            json!({"attributes": {"expiryTime": "P27D"}}),
        ),
        (
            "rotation less than 7 days before expiry",
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P85D"}, "action": {"type": "Rotate"}}], "attributes": {"expiryTime": "P90D"}}),
        ),
        (
            "timeBeforeExpiry without expiryTime",
            json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Rotate"}}]}),
        ),
        (
            "not a duration",
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "30 days"}, "action": {"type": "Rotate"}}]}),
        ),
        (
            "both triggers",
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D", "timeBeforeExpiry": "P30D"}, "action": {"type": "Rotate"}}], "attributes": {"expiryTime": "P90D"}}),
        ),
    ] {
        let (s, v) = vault.put("/keys/kek/rotationpolicy", body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("BadParameter")),
            "{what}: {v}"
        );
    }
    let (s, v) = vault.get("/keys/nokey/rotationpolicy").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("KeyNotFound")));

    // Their own permissions, named like the RBAC data actions.
    let p = kv.principal("reader", &[Op::Get]);
    let t2 = token(&c, &kv.emu, &p, "https://vault.azure.net").await;
    let reader = Api::new(&c, &kv.emu, &t2, VAULT);
    let (s, v) = reader.get("/keys/kek/rotationpolicy").await;
    assert_eq!((s, inner_code(&v)), (403, Some("ForbiddenByRbac")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/rotationpolicy/read'"),
        "{msg}"
    );
    kv.emu
        .grant(
            &p.client_id,
            &Op::parse_list("getrotationpolicy").unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(reader.get("/keys/kek/rotationpolicy").await.0, 200);
    let (s, v) = reader
        .put("/keys/kek/rotationpolicy", json!({"lifetimeActions": []}))
        .await;
    assert_eq!((s, inner_code(&v)), (403, Some("ForbiddenByRbac")), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Action: 'Microsoft.KeyVault/vaults/keys/rotationpolicy/write'"),
        "{v}"
    );
}

#[tokio::test]
async fn policies_rotate_keys_when_the_emulated_clock_passes_their_trigger() {
    let kv = Kv::start();
    let c = client(&kv.emu);
    let (_, t) = admin_principal(&c, &kv.emu).await;
    let vault = Api::new(&c, &kv.emu, &t, VAULT);
    let (s, v) = vault
        .post(
            "/keys/kek/create",
            Some(json!({"kty": "RSA", "key_size": 3072})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let v1 = version_of(&v);
    let t0 = v["attributes"]["created"].as_i64().unwrap();
    let (s, wrapped) = vault
        .wrap(
            &format!("/keys/kek/{v1}/wrapkey"),
            "RSA-OAEP-256",
            &[9u8; 32],
        )
        .await;
    assert_eq!(s, 200);
    kv.rotate_every("kek", days(30), Some(days(90)));

    // Not yet due.
    let info = kv.advance_clock(days(29));
    assert!(info.rotated.is_empty(), "{info:?}");
    assert!(info.offset_seconds >= (29 * DAY) as i64);
    assert_eq!(version_of(&vault.get("/keys/kek").await.1), v1);

    // Past the trigger: one new version, created at the trigger time on the emulated clock,
    // same type and size, expiring expiryTime after its creation.
    let info = kv.advance_clock(days(2));
    assert_eq!(info.rotated.len(), 1, "{info:?}");
    assert_eq!(info.rotated[0].name, "kek");
    let v2 = info.rotated[0].version.clone();
    let (s, latest) = vault.get("/keys/kek").await;
    assert_eq!(s, 200);
    assert_eq!(version_of(&latest), v2);
    let created = latest["attributes"]["created"].as_i64().unwrap();
    assert_eq!(created, t0 + (30 * DAY) as i64, "{latest}");
    assert_eq!(latest["attributes"]["updated"], created);
    assert_eq!(
        latest["attributes"]["exp"].as_i64(),
        Some(created + (90 * DAY) as i64)
    );
    assert_eq!(latest["key"]["kty"], "RSA");
    assert_eq!(
        latest["key"]["n"].as_str().unwrap().len(),
        512,
        "3072-bit modulus"
    );
    let (_, versions) = vault.get("/keys/kek/versions").await;
    assert_eq!(versions["value"].as_array().unwrap().len(), 2);

    // The old version still unwraps what it wrapped.
    let old = kvcrypt_testkit::data::unb64(wrapped["value"].as_str().unwrap());
    let (s, v) = vault
        .wrap(&format!("/keys/kek/{v1}/unwrapkey"), "RSA-OAEP-256", &old)
        .await;
    assert_eq!(s, 200, "{v}");

    // A jump over several periods catches up, each version at its own trigger time.
    let info = kv.advance_clock(days(61));
    let times: Vec<i64> = info.rotated.iter().map(|r| r.created).collect();
    assert_eq!(
        times,
        vec![t0 + (60 * DAY) as i64, t0 + (90 * DAY) as i64],
        "{info:?}"
    );

    // An on-demand rotation applies the policy's expiry too, at the emulated now.
    let (s, v) = vault.post("/keys/kek/rotate", None).await;
    assert_eq!(s, 200, "{v}");
    let now = kv.emu.clock().now;
    let created = v["attributes"]["created"].as_i64().unwrap();
    assert!((now - 5..=now).contains(&created), "{v} vs {now}");
    assert_eq!(
        v["attributes"]["exp"].as_i64(),
        Some(created + (90 * DAY) as i64)
    );
}

#[tokio::test]
async fn rotation_is_also_evaluated_lazily_on_requests() {
    let kv = Kv::start();
    let c = client(&kv.emu);
    let (_, t) = admin_principal(&c, &kv.emu).await;
    let vault = Api::new(&c, &kv.emu, &t, VAULT);
    let v1 = kv.emu.create_key("lazy", "RSA", Some(2048)).unwrap();
    // The clock passes the trigger before the policy exists; setting it makes the key due,
    // and the next request sees the rotated key.
    kv.advance_clock(days(40));
    kv.rotate_every("lazy", days(30), None);
    let (s, v) = vault.get("/keys/lazy").await;
    assert_eq!(s, 200);
    assert_ne!(version_of(&v), v1, "{v}");
    assert!(v["attributes"].get("exp").is_none(), "no expiryTime: {v}");
}

#[tokio::test]
async fn key_times_and_validity_checks_follow_the_emulated_clock() {
    let kv = Kv::start();
    let c = client(&kv.emu);
    let (_, t) = admin_principal(&c, &kv.emu).await;
    let vault = Api::new(&c, &kv.emu, &t, VAULT);
    let wall = unix_now();
    let exp = wall + (10 * DAY) as i64;
    let nbf = wall + (3 * DAY) as i64;
    let (s, v) = vault
        .post(
            "/keys/k/create",
            Some(json!({"kty": "RSA", "attributes": {"exp": exp, "nbf": nbf}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = vault
        .wrap("/keys/k//wrapkey", "RSA-OAEP-256", &[1u8; 32])
        .await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyNotYetValid")), "{v}");
    kv.advance_clock(days(4));
    assert_eq!(
        vault
            .wrap("/keys/k//wrapkey", "RSA-OAEP-256", &[1u8; 32])
            .await
            .0,
        200
    );
    kv.advance_clock(days(7));
    let (s, v) = vault
        .wrap("/keys/k//wrapkey", "RSA-OAEP-256", &[1u8; 32])
        .await;
    assert_eq!((s, inner_code(&v)), (403, Some("KeyExpired")), "{v}");

    // New versions, updates and deletions are stamped with the emulated time.
    let now = kv.emu.clock().now;
    assert!(now >= wall + (11 * DAY) as i64);
    let (_, v) = vault
        .post("/keys/k2/create", Some(json!({"kty": "RSA"})))
        .await;
    let created = v["attributes"]["created"].as_i64().unwrap();
    assert!((now..=now + 5).contains(&created), "{v}");
    let (_, v) = vault
        .patch("/keys/k2/", json!({"attributes": {"enabled": true}}))
        .await;
    assert!(v["attributes"]["updated"].as_i64().unwrap() >= now, "{v}");
    let (_, v) = vault.delete("/keys/k2").await;
    assert!(v["deletedDate"].as_i64().unwrap() >= now, "{v}");
    // Tokens stay on the wall clock: the 1-hour token still works after 11 emulated days.
    assert_eq!(vault.get("/keys").await.0, 200);
}

#[tokio::test]
async fn admin_clock_interface() {
    let kv = Kv::start();
    let c = client(&kv.emu);
    let admin = |m: reqwest::Method, body: Option<Value>| {
        let mut rb = c
            .request(m, format!("{}/clock", kv.emu.admin_url()))
            .bearer_auth(kv.emu.admin_token());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        async move {
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = admin(reqwest::Method::GET, None).await;
    assert_eq!((s, v["offset_seconds"].as_i64()), (200, Some(0)), "{v}");
    let start = v["now"].as_i64().unwrap();
    kv.emu.create_key("k", "oct", Some(256)).unwrap();
    kv.rotate_every("k", days(7), None);
    let (s, v) = admin(
        reqwest::Method::POST,
        Some(json!({"advance_seconds": 8 * DAY})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["offset_seconds"], 8 * DAY);
    assert!(v["now"].as_i64().unwrap() >= start + (8 * DAY) as i64);
    assert_eq!(v["rotated"][0]["name"], "k", "{v}");
    let (s, v) = admin(reqwest::Method::POST, Some(json!({"advance_seconds": -1}))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(kv.emu.clock().offset_seconds, (8 * DAY) as i64);
}

#[tokio::test]
async fn policies_and_the_clock_offset_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || kvcrypt_kv_emulator::EmulatorConfig {
        state_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let kv = Kv::with(config());
    kv.emu.create_key("kek", "RSA", Some(2048)).unwrap();
    kv.rotate_every("kek", days(30), Some(days(60)));
    kv.advance_clock(days(3));
    drop(kv);

    let kv = Kv::with(config());
    assert_eq!(kv.emu.clock().offset_seconds, (3 * DAY) as i64);
    let c = client(&kv.emu);
    let (_, t) = admin_principal(&c, &kv.emu).await;
    let vault = Api::new(&c, &kv.emu, &t, VAULT);
    let (s, v) = vault.get("/keys/kek/rotationpolicy").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["attributes"]["expiryTime"], "P60D", "{v}");
    assert_eq!(
        v["lifetimeActions"][0]["trigger"]["timeAfterCreate"], "P30D",
        "{v}"
    );
    // The policy still drives rotation after the restart.
    let info = kv.advance_clock(days(28));
    assert_eq!(info.rotated.len(), 1, "{info:?}");
}
