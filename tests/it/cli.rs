//! The `creditgate` binary: check-config, migrate, user create, key create.

use crate::common;

use std::process::{Command, Output};

use common::TestDb;
use sha2::{Digest, Sha256};

fn creditgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run creditgate")
}

fn field(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
}

/// Secrets of our own, replacing the shipped `change-me` examples.
const OWN_SECRETS: [(&str, &str); 2] = [
    (
        "CREDITGATE_AUTH__ADMIN_KEYS",
        r#"[{ name = "ops", key = "cli-test-admin-secret" }]"#,
    ),
    (
        "CREDITGATE_AUTH__SERVICE_KEYS",
        r#"[{ name = "hub", key = "cli-test-service-secret" }]"#,
    ),
];

#[test]
fn serve_and_check_config_refuse_the_example_secrets() {
    for command in ["check-config", "serve"] {
        let out = creditgate(&[command], &[("CREDITGATE_SERVER__LISTEN", "127.0.0.1:0")]);
        assert!(!out.status.success(), "{command} accepted change-me keys");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("auth.admin_keys[0].key") && stderr.contains("change-me"),
            "{command}: {stderr}"
        );
    }
    let only_admin = creditgate(&["check-config"], &OWN_SECRETS[..1]);
    assert!(!only_admin.status.success());
    assert!(String::from_utf8_lossy(&only_admin.stderr).contains("auth.service_keys[0].key"));
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_the_bad_key() {
    let ok = creditgate(&["check-config"], &OWN_SECRETS);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("6 modules, 5 plans"));

    let dir = std::env::temp_dir().join(format!("cg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let bad = dir.join("bad.toml");
    let shipped = std::fs::read_to_string("config/creditgate.toml").expect("shipped config");
    std::fs::write(&bad, shipped.replace("cost = 2\n", "cost = -2\n")).expect("write");
    let out = creditgate(
        &["--config", bad.to_str().expect("utf8"), "check-config"],
        &OWN_SECRETS,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("modules.park.cost"), "{stderr}");

    let env_bad = creditgate(
        &["check-config"],
        &[
            OWN_SECRETS[0],
            OWN_SECRETS[1],
            ("CREDITGATE_MODULES__RAG__UPSTREAM", "ftp://nowhere"),
        ],
    );
    assert!(!env_bad.status.success());
    assert!(String::from_utf8_lossy(&env_bad.stderr).contains("modules.rag.upstream"));

    // Redis Cluster URLs: check-config uses the parser serve connects with.
    let cluster = |url: &'static str| {
        creditgate(
            &["check-config"],
            &[
                OWN_SECRETS[0],
                OWN_SECRETS[1],
                ("CREDITGATE_REDIS__URL", url),
            ],
        )
    };
    let ok = cluster("redis+cluster://10.0.0.1:7000,10.0.0.2:7000");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = cluster("redis+cluster://");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("redis.url"));
}

#[tokio::test]
async fn migrate_user_create_and_key_create_store_only_key_hashes() {
    // A database that does not exist yet: `migrate` creates it.
    let db = TestDb::named_but_not_created();
    let env = [("CREDITGATE_DATABASE__URL", db.url.as_str())];
    let migrate = creditgate(&["migrate"], &env);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let created = creditgate(
        &["user", "create", "--name", "Amina", "--plan", "pro"],
        &env,
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let stdout = String::from_utf8_lossy(&created.stdout);
    let user = field(&stdout, "user_id");
    let first = field(&stdout, "api_key");
    assert!(first.starts_with("cg_"));

    let second = creditgate(&["key", "create", "--user", &user], &env);
    assert!(second.status.success());
    let second = field(&String::from_utf8_lossy(&second.stdout), "api_key");
    assert_ne!(first, second);

    let pool = sqlx::PgPool::connect(&db.url).await.expect("db");
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key_hash, prefix FROM api_keys WHERE user_id = $1 ORDER BY created_at",
    )
    .bind(&user)
    .fetch_all(&pool)
    .await
    .expect("keys");
    let hashes: Vec<String> = rows.iter().map(|(h, _)| h.clone()).collect();
    let expected: Vec<String> = [&first, &second]
        .iter()
        .map(|k| hex::encode(Sha256::digest(k.as_bytes())))
        .collect();
    assert_eq!(hashes, expected);
    for ((hash, prefix), key) in rows.iter().zip([&first, &second]) {
        assert!(!hash.contains(&key[3..]), "the key itself is stored");
        assert!(key.starts_with(prefix.as_str()) && prefix.len() == 11);
    }

    let unknown_plan = creditgate(&["user", "create", "--name", "X", "--plan", "gold"], &env);
    assert!(!unknown_plan.status.success());
    assert!(String::from_utf8_lossy(&unknown_plan.stderr).contains("gold"));
    let unknown_user = creditgate(&["key", "create", "--user", "nobody"], &env);
    assert!(!unknown_user.status.success());
    pool.close().await;
}
