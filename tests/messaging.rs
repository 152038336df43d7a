//! Messaging end to end: the controller provisions inboxes and ACL users in real Redis
//! (standalone from `hack/redis`, its 3-master cluster, or a private redis-server for restarts),
//! the relay delivers, and agents use their own credentials. What runs inside an agent's pod
//! (the client library, `agentry send/recv`) runs here as local code or processes over the real
//! identity files from the Agent's Secret.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentry::crd::Agent;
use agentry::messaging::client::Credentials;
use agentry::messaging::conn::Conn;
use common::redis::{self as r, Mode};
use common::*;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

fn messaging_ready(a: &Agent) -> bool {
    condition(a, "MessagingReady").is_some_and(|c| c.status == "True")
        && a.status
            .as_ref()
            .and_then(|s| s.messaging.as_ref())
            .is_some()
}

/// A controller with messaging on `mode`, watching `ns`.
fn controller(ns: &str, mode: Mode, extra: &[&str]) -> ControllerProcess {
    controller_on(ns, mode.controller_args(), extra, None)
}

fn controller_on(
    ns: &str,
    mut args: Vec<String>,
    extra: &[&str],
    data_dir: Option<&std::path::Path>,
) -> ControllerProcess {
    args.extend(["--api-addr".to_string(), String::new()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = r::env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut opts = ControllerOptions::new(ns);
    opts.extra_args = args;
    opts.data_dir = data_dir;
    ControllerProcess::start_with_env(opts, &env)
}

async fn agent(client: &kube::Client, ns: &str, name: &str, messaging: serde_json::Value) -> Agent {
    let mut manifest = agent_manifest(name, r::messaging(messaging));
    merge(&mut manifest, json!({"spec": {"capabilities": ["chat"]}}));
    create_agent(client, ns, manifest).await.unwrap();
    wait_agent(
        client,
        ns,
        name,
        Duration::from_secs(60),
        "MessagingReady",
        messaging_ready,
    )
    .await
}

async fn exchange(mode: Mode) {
    let (client, ns) = setup(&format!(
        "msg-{}",
        if mode == Mode::Cluster { "c" } else { "s" }
    ))
    .await;
    let _c = controller(&ns.name, mode, &[]);
    let alice = agent(&client, &ns.name, "alice", json!({})).await;
    agent(&client, &ns.name, "bob", json!({})).await;
    let status = alice.status.unwrap().messaging.unwrap();
    assert_eq!(status.inbox, format!("agentry:{{{}/alice}}:inbox", ns.name));
    assert_eq!(status.user, format!("agent:{}:alice", ns.name));
    let mut a = r::mailbox(&client, &ns.name, "alice", "a-1").await;
    let mut b = r::mailbox(&client, &ns.name, "bob", "b-1").await;
    let to_bob = format!("{}/bob", ns.name);
    let to_alice = format!("{}/alice", ns.name);
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            a.send(&to_bob, "task.request", &format!("{{\"n\":{i}}}"))
                .await
                .unwrap(),
        );
    }
    let got = recv_n(&mut b, 20).await;
    // In order, from alice's SPIFFE ID, with the ids the sender got.
    let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, sent.iter().map(String::as_str).collect::<Vec<_>>());
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            m.from,
            format!("spiffe://cluster.local/ns/{}/agent/alice", ns.name)
        );
        assert_eq!(m.to, to_bob);
        assert_eq!(m.kind, "task.request");
        assert_eq!(m.body, format!("{{\"n\":{i}}}"));
        assert!(m.ts > 0);
    }
    // And back.
    let reply = b.send(&to_alice, "task.result", "done").await.unwrap();
    let back = recv_n(&mut a, 1).await;
    assert_eq!(back[0].id, reply);
    assert_eq!(
        back[0].from,
        format!("spiffe://cluster.local/ns/{}/agent/bob", ns.name)
    );

    // `from` cannot be forged: a `from` field alice writes into her outbox is ignored.
    let creds = r::credentials(&client, &ns.name, "alice").await;
    let mut raw = r::as_agent(&creds).await;
    let forged: ::redis::RedisResult<String> = ::redis::cmd("XADD")
        .arg(&creds.endpoint.outbox)
        .arg("*")
        .arg("from")
        .arg(format!("spiffe://cluster.local/ns/{}/agent/bob", ns.name))
        .arg("to")
        .arg(&to_bob)
        .arg("type")
        .arg("forged")
        .arg("body")
        .arg("x")
        .query_async(&mut raw)
        .await;
    forged.unwrap();
    let m = recv_n(&mut b, 1).await;
    assert_eq!(m[0].kind, "forged");
    assert_eq!(
        m[0].from,
        format!("spiffe://cluster.local/ns/{}/agent/alice", ns.name)
    );

    // Isolation, on this mode's Redis (on a cluster every node has the users).
    let bob = r::credentials(&client, &ns.name, "bob").await;
    let report = attack(&creds, &bob).await;
    assert!(
        report.successes.is_empty(),
        "alice's credentials did this to bob's keys: {:#?}",
        report.successes
    );
    assert!(report.tried > 40, "{}", report.tried);
}

/// Receives (and acknowledges) exactly `n` messages within 15 s.
async fn recv_n(
    mailbox: &mut agentry::messaging::client::Mailbox,
    n: usize,
) -> Vec<agentry::messaging::Message> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of {n} messages: {got:?}",
            got.len()
        );
        for m in mailbox.recv(50, Duration::from_secs(1)).await.unwrap() {
            mailbox.ack(&[&m.entry]).await.unwrap();
            got.push(m);
        }
    }
    assert_eq!(got.len(), n, "more messages than sent: {got:?}");
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_exchange_messages_on_standalone_redis() {
    exchange(Mode::Standalone).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_exchange_messages_on_a_redis_cluster() {
    exchange(Mode::Cluster).await;
}

/// What an attack with one agent's credentials achieved.
struct Attack {
    tried: usize,
    successes: Vec<String>,
}

/// Every stream command (and the generic key commands) on every one of `victim`'s keys, with
/// `attacker`'s credentials. Also checks the attacker cannot write its own inbox (which would
/// let it forge `from` to itself) nor trim or delete its own streams.
async fn attack(attacker: &Credentials, victim: &Credentials) -> Attack {
    // Straight to every node (ACLs are per node on a cluster; Redis checks them before it
    // redirects), so no client-side routing hides an answer.
    let mut report = Attack {
        tried: 0,
        successes: Vec::new(),
    };
    for url in &attacker.endpoint.urls {
        let mut conn = agentry::messaging::conn::Target {
            urls: vec![url.clone()],
            cluster: false,
            username: Some(attacker.endpoint.user.clone()),
            password: Some(attacker.password.clone()),
        }
        .connect()
        .await
        .unwrap();
        let one = attack_node(&mut conn, attacker, victim).await;
        report.tried += one.tried;
        report
            .successes
            .extend(one.successes.into_iter().map(|s| format!("{url}: {s}")));
    }
    report
}

async fn attack_node(conn: &mut Conn, attacker: &Credentials, victim: &Credentials) -> Attack {
    let v = &victim.endpoint;
    let own = &attacker.endpoint;
    let mut tried = 0;
    let mut successes = Vec::new();
    let keys = [v.inbox.as_str(), v.dead.as_str(), v.outbox.as_str()];
    let mut commands: Vec<Vec<String>> = Vec::new();
    let s = |parts: &[&str]| parts.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    for k in keys {
        for c in [
            s(&["XADD", k, "*", "to", "x/y", "type", "t", "body", "b"]),
            s(&["XADD", k, "MAXLEN", "0", "*", "a", "b"]),
            s(&["XADD", k, "MINID", "99999999999999", "*", "a", "b"]),
            s(&["XREAD", "COUNT", "10", "STREAMS", k, "0"]),
            s(&[
                "XREADGROUP",
                "GROUP",
                "agent",
                "evil",
                "COUNT",
                "10",
                "STREAMS",
                k,
                ">",
            ]),
            s(&[
                "XREADGROUP",
                "GROUP",
                "agent",
                "evil",
                "COUNT",
                "10",
                "STREAMS",
                k,
                "0",
            ]),
            s(&[
                "XREADGROUP",
                "GROUP",
                "relay",
                "evil",
                "COUNT",
                "10",
                "STREAMS",
                k,
                ">",
            ]),
            s(&["XRANGE", k, "-", "+"]),
            s(&["XREVRANGE", k, "+", "-"]),
            s(&["XLEN", k]),
            s(&["XACK", k, "agent", "0-1"]),
            s(&["XCLAIM", k, "agent", "evil", "0", "0-1"]),
            s(&["XAUTOCLAIM", k, "agent", "evil", "0", "0-0"]),
            s(&["XAUTOCLAIM", k, "relay", "evil", "0", "0-0"]),
            s(&["XPENDING", k, "agent"]),
            s(&["XINFO", "STREAM", k]),
            s(&["XINFO", "GROUPS", k]),
            s(&["XINFO", "CONSUMERS", k, "agent"]),
            s(&["XGROUP", "CREATE", k, "evil", "0"]),
            s(&["XGROUP", "DESTROY", k, "agent"]),
            s(&["XGROUP", "SETID", k, "agent", "$"]),
            s(&["XGROUP", "CREATECONSUMER", k, "agent", "evil"]),
            s(&["XGROUP", "DELCONSUMER", k, "agent", "b-1"]),
            s(&["XTRIM", k, "MAXLEN", "0"]),
            s(&["XDEL", k, "0-1"]),
            s(&["XSETID", k, "99999999999999-0"]),
            s(&["DEL", k]),
            s(&["UNLINK", k]),
            s(&["EXPIRE", k, "1"]),
            s(&["RENAME", k, &format!("{k}-x")]),
            s(&["COPY", k, &format!("{k}-x")]),
            s(&["DUMP", k]),
            s(&["TYPE", k]),
            s(&["EXISTS", k]),
            s(&["OBJECT", "ENCODING", k]),
            s(&[
                "EVAL",
                "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)",
                "1",
                k,
            ]),
        ] {
            commands.push(c);
        }
    }
    for c in [
        s(&["KEYS", "*"]),
        s(&["SCAN", "0"]),
        s(&["FLUSHALL"]),
        s(&["CONFIG", "GET", "*"]),
        s(&["ACL", "LIST"]),
        s(&["ACL", "SETUSER", &v.user, "nopass"]),
        s(&["MONITOR"]),
        s(&["PUBLISH", "x", "y"]),
        s(&["FUNCTION", "LIST"]),
        s(&["SCRIPT", "FLUSH"]),
        s(&["CLIENT", "LIST"]),
        s(&["CLIENT", "KILL", "TYPE", "normal"]),
        // Its own inbox: read-only plus acknowledgement; its own streams cannot be trimmed.
        s(&[
            "XADD",
            &own.inbox,
            "*",
            "from",
            &v.spiffe_id,
            "to",
            "x/y",
            "type",
            "t",
            "body",
            "b",
        ]),
        s(&["XTRIM", &own.inbox, "MAXLEN", "0"]),
        s(&["XGROUP", "DESTROY", &own.inbox, "agent"]),
        s(&["DEL", &own.inbox]),
        s(&["XDEL", &own.outbox, "0-1"]),
        s(&["XTRIM", &own.outbox, "MAXLEN", "0"]),
    ] {
        commands.push(c);
    }
    for c in commands {
        tried += 1;
        let mut cmd = ::redis::cmd(&c[0]);
        for a in &c[1..] {
            cmd.arg(a);
        }
        let result: ::redis::RedisResult<::redis::Value> = cmd.query_async(conn).await;
        match result {
            Ok(v) => successes.push(format!("{c:?} -> {v:?}")),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("NOPERM") || text.contains("no permissions"),
                    "{c:?} failed for another reason than ACLs (the test would not prove isolation): {text}"
                );
            }
        }
    }
    // The positive control: what alice must be able to do still works (or is redirected to
    // the node that holds the key, which means the ACL let it through).
    let own_len: ::redis::RedisResult<i64> =
        ::redis::cmd("XLEN").arg(&own.inbox).query_async(conn).await;
    if let Err(e) = own_len {
        assert_eq!(
            e.code(),
            Some("MOVED"),
            "alice cannot read her own inbox: {e}"
        );
    }
    Attack { tried, successes }
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_bad_input_and_undeliverable_notices() {
    let (client, ns) = setup("msg-policy").await;
    let _c = controller(&ns.name, Mode::Standalone, &[]);
    agent(&client, &ns.name, "alice", json!({})).await;
    // closed accepts nobody; planners accepts only Agents with the "plan" capability.
    agent(&client, &ns.name, "closed", json!({"allowFrom": []})).await;
    agent(
        &client,
        &ns.name,
        "planners",
        json!({"allowFrom": [{"capabilities": ["plan"]}]}),
    )
    .await;
    let mut a = r::mailbox(&client, &ns.name, "alice", "a").await;
    let mut closed = r::mailbox(&client, &ns.name, "closed", "c").await;
    let mut planners = r::mailbox(&client, &ns.name, "planners", "p").await;
    let n = &ns.name;
    let to_closed = a.send(&format!("{n}/closed"), "t", "x").await.unwrap();
    let to_planners = a.send(&format!("{n}/planners"), "t", "x").await.unwrap();
    let to_nobody = a.send(&format!("{n}/nobody"), "t", "x").await.unwrap();
    let to_foreign = a.send("kube-system/anything", "t", "x").await.unwrap();

    // Refused before anything is written, naming the field and the fix.
    let e = a
        .send(&format!("{n}/closed"), "t", &"x".repeat(65_537))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("body: 65537 bytes is over the 65536-byte limit"),
        "{e}"
    );
    let e = a.send("not a target", "t", "x").await.unwrap_err();
    assert!(e.to_string().starts_with("to: "), "{e}");
    let e = a.send(&format!("{n}/closed"), "", "x").await.unwrap_err();
    assert!(e.to_string().starts_with("type: "), "{e}");
    // The relay refuses the same when a client skips the checks (raw XADD to the outbox).
    let creds = r::credentials(&client, n, "alice").await;
    let mut raw = r::as_agent(&creds).await;
    let _: String = ::redis::cmd("XADD")
        .arg(&creds.endpoint.outbox)
        .arg("*")
        .arg("id")
        .arg("big-1")
        .arg("to")
        .arg(format!("{n}/planners"))
        .arg("type")
        .arg("t")
        .arg("body")
        .arg("x".repeat(70_000))
        .query_async(&mut raw)
        .await
        .unwrap();

    // Every refusal comes back to alice as a notice, with the reason.
    let (_, _) = (&to_closed, &to_planners);
    let mut notices = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while notices.len() < 5 && tokio::time::Instant::now() < deadline {
        for m in a.recv(10, Duration::from_secs(1)).await.unwrap() {
            assert_eq!(m.kind, "agentry.undeliverable");
            assert_eq!(m.from, "spiffe://cluster.local/agentry/relay");
            let body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
            notices.insert(
                body["id"].as_str().unwrap().to_string(),
                body["error"].as_str().unwrap().to_string(),
            );
            a.ack(&[&m.entry]).await.unwrap();
        }
    }
    assert!(
        notices[&to_closed].contains("does not accept messages")
            && notices[&to_closed].contains("allowFrom"),
        "{notices:?}"
    );
    assert!(notices[&to_planners].contains("allowFrom"), "{notices:?}");
    assert!(
        notices[&to_nobody].contains("does not exist"),
        "{notices:?}"
    );
    // Across namespaces one answer for "missing" and "forbidden": nothing leaks.
    assert!(
        notices[&to_foreign].contains("cannot be reached"),
        "{notices:?}"
    );
    assert!(
        notices["big-1"].contains("over the 65536-byte limit"),
        "{notices:?}"
    );
    // 0 messages delivered where the policy forbids.
    assert!(
        closed
            .recv(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        planners
            .recv(10, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );

    // The CLI says the same, with exit code 2.
    let dir = tempfile::tempdir().unwrap();
    r::write_identity(&client, n, "alice", dir.path()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "send",
            "--identity-dir",
            dir.path().to_str().unwrap(),
            "--to",
            &format!("{n}/closed"),
            "--body",
            &"y".repeat(70_000),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--message-body-limit"));
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "send",
            "--identity-dir",
            dir.path().to_str().unwrap(),
            "--to",
            "Bad/Target",
            "--body",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("to: \"Bad/Target\" is not an Agent reference")
    );
}

fn recv_process(dir: &std::path::Path, consumer: &str, exec: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["recv", "--follow", "--identity-dir", dir.to_str().unwrap()])
        .args([
            "--consumer",
            consumer,
            "--claim-idle",
            "500ms",
            "--wait",
            "1s",
            "--exec",
            exec,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn pending(admin: &mut Conn, inbox: &str) -> Vec<(String, String, usize)> {
    let reply: ::redis::streams::StreamPendingCountReply = ::redis::cmd("XPENDING")
        .arg(inbox)
        .arg("agent")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(admin)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|p| (p.id, p.consumer, p.times_delivered))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_mid_message_is_redelivered_and_poison_goes_to_dead_letters() {
    let (client, ns) = setup("msg-redeliver").await;
    let _c = controller(&ns.name, Mode::Standalone, &[]);
    agent(&client, &ns.name, "alice", json!({})).await;
    let bob = agent(&client, &ns.name, "bob", json!({})).await;
    let inbox = bob.status.unwrap().messaging.unwrap().inbox;
    let mut admin = Mode::Standalone.admin().await;
    let mut a = r::mailbox(&client, &ns.name, "alice", "a").await;
    let dir = tempfile::tempdir().unwrap();
    r::write_identity(&client, &ns.name, "bob", dir.path()).await;

    // Consumer 1 takes the message and hangs in its handler; SIGKILL it mid-message.
    let mut c1 = recv_process(dir.path(), "c1", "sleep 60");
    let id = a
        .send(&format!("{}/bob", ns.name), "job", "important")
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "c1 to hold the message", || {
        let (inbox, admin) = (inbox.clone(), admin.clone());
        async move {
            pending(&mut admin.clone(), &inbox)
                .await
                .iter()
                .any(|p| p.1 == "c1")
        }
    })
    .await;
    c1.kill().unwrap();
    c1.wait().unwrap();
    // Consumer 2 gets it after the idle timeout, and acknowledges it.
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut c2 = recv_process(
        dir.path(),
        "c2",
        &format!("cat >> {}", out.path().display()),
    );
    eventually(
        Duration::from_secs(15),
        "c2 to process the message",
        || async {
            std::fs::read_to_string(out.path())
                .unwrap_or_default()
                .contains(&id)
        },
    )
    .await;
    let line = std::fs::read_to_string(out.path()).unwrap();
    let m: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(m["body"], "important");
    assert!(m["deliveries"].as_u64().unwrap() >= 2, "{m}");
    eventually(Duration::from_secs(10), "nothing pending", || {
        let (inbox, admin) = (inbox.clone(), admin.clone());
        async move { pending(&mut admin.clone(), &inbox).await.is_empty() }
    })
    .await;
    c2.kill().unwrap();
    c2.wait().unwrap();

    // A poison message: the handler always fails. After 5 deliveries it is dead-lettered.
    let mut c3 = recv_process(dir.path(), "c3", "exit 1");
    let poison = a
        .send(&format!("{}/bob", ns.name), "job", "poison")
        .await
        .unwrap();
    let dead_key = format!("agentry:{{{}/bob}}:dead", ns.name);
    eventually(
        Duration::from_secs(30),
        "the poison message in the dead-letter stream",
        || {
            let (key, admin) = (dead_key.clone(), admin.clone());
            async move {
                let n: i64 = ::redis::cmd("XLEN")
                    .arg(&key)
                    .query_async(&mut admin.clone())
                    .await
                    .unwrap_or(0);
                n == 1
            }
        },
    )
    .await;
    c3.kill().unwrap();
    c3.wait().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "recv",
            "--dead",
            "--identity-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let dead: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dead["id"], poison.as_str());
    assert_eq!(dead["body"], "poison");
    assert_eq!(dead["deliveries"], 5);
    assert!(
        dead["reason"]
            .as_str()
            .unwrap()
            .contains("delivered 5 times without an acknowledgement")
    );
    // Nothing lost, nothing left pending.
    assert!(pending(&mut admin, &inbox).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_and_relay_kill_lose_no_message() {
    let (client, ns) = setup("msg-restart").await;
    let mut redis = r::PrivateRedis::start();
    let data = tempfile::tempdir().unwrap();
    let args = vec!["--redis-url".to_string(), redis.url()];
    let mut c = controller_on(&ns.name, args.clone(), &[], Some(data.path()));
    agent(&client, &ns.name, "alice", json!({})).await;
    agent(&client, &ns.name, "bob", json!({})).await;
    let to = format!("{}/bob", ns.name);
    let mut a = r::mailbox(&client, &ns.name, "alice", "a").await;
    let mut b = r::mailbox(&client, &ns.name, "bob", "b").await;
    let mut sent = HashSet::new();
    for i in 0..50 {
        sent.insert(a.send(&to, "n", &i.to_string()).await.unwrap());
    }
    let (got, _) = r::receive_ids(&mut b, 50, Duration::from_secs(20)).await;
    assert_eq!(got, sent);

    // Redis restarts (SIGTERM: the AOF is flushed). Senders retry until it is back; every
    // message whose send was acknowledged arrives. ACL users come back without rotation.
    let password_before = r::credentials(&client, &ns.name, "bob").await.password;
    for i in 50..100 {
        sent.insert(a.send(&to, "n", &i.to_string()).await.unwrap());
    }
    redis.restart();
    for i in 100..150 {
        loop {
            match a.send(&to, "n", &i.to_string()).await {
                Ok(id) => {
                    sent.insert(id);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let (more, _) = r::receive_ids(&mut b, 100, Duration::from_secs(90)).await;
    let got: HashSet<String> = got.union(&more).cloned().collect();
    let missing: Vec<_> = sent.difference(&got).collect();
    if !missing.is_empty() {
        let log = c.logs();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .rev()
            .take(40)
            .collect();
        let mut admin = agentry::messaging::conn::Target {
            urls: vec![redis.url()],
            cluster: false,
            username: Some("default".into()),
            password: Some(r::password()),
        }
        .connect()
        .await
        .unwrap();
        let mut state = String::new();
        for k in [
            r::credentials(&client, &ns.name, "alice")
                .await
                .endpoint
                .outbox,
            r::credentials(&client, &ns.name, "bob")
                .await
                .endpoint
                .inbox,
        ] {
            let len: ::redis::RedisResult<i64> =
                ::redis::cmd("XLEN").arg(&k).query_async(&mut admin).await;
            let groups: ::redis::RedisResult<::redis::Value> = ::redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&k)
                .query_async(&mut admin)
                .await;
            state.push_str(&format!("{k}: len {len:?} groups {groups:?}\n"));
        }
        panic!(
            "{} acknowledged messages lost after a Redis restart ({} received); {state}; controller log (newest first):\n{}",
            missing.len(),
            got.len(),
            tail.join("\n")
        );
    }
    assert_eq!(
        r::credentials(&client, &ns.name, "bob").await.password,
        password_before
    );

    // The relay (the controller) is SIGKILLed mid-stream and restarted on the same data and
    // replica name: it finishes what it had read. Nothing lost; duplicates are counted.
    let sender = {
        let (client, n, to) = (client.clone(), ns.name.clone(), to.clone());
        tokio::spawn(async move {
            let mut a = r::mailbox(&client, &n, "alice", "a2").await;
            let mut ids = HashSet::new();
            for i in 0..600 {
                ids.insert(a.send(&to, "n", &i.to_string()).await.unwrap());
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.kill();
    let _c2 = controller_on(&ns.name, args, &[], Some(data.path()));
    let ids = sender.await.unwrap();
    let (got, copies) = r::receive_ids(&mut b, 600, Duration::from_secs(60)).await;
    let missing = ids.difference(&got).count();
    assert_eq!(missing, 0, "messages lost when the relay was killed");
    let duplicates = copies - got.len();
    // At-least-once: at most one batch per relay shard can be delivered twice.
    assert!(duplicates <= 256 * 8, "{duplicates} duplicates");
    eprintln!("relay killed mid-stream: 600 sent, 600 received, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn resharding_the_inbox_slot_keeps_delivering() {
    let (client, ns) = setup("msg-reshard").await;
    let _c = controller(&ns.name, Mode::Cluster, &[]);
    agent(&client, &ns.name, "alice", json!({})).await;
    let bob = agent(&client, &ns.name, "bob", json!({})).await;
    let inbox = bob.status.unwrap().messaging.unwrap().inbox;
    let to = format!("{}/bob", ns.name);
    let mut b = r::mailbox(&client, &ns.name, "bob", "b").await;
    let sender = {
        let (client, n, to) = (client.clone(), ns.name.clone(), to.clone());
        tokio::spawn(async move {
            let mut a = r::mailbox(&client, &n, "alice", "a").await;
            let mut ids = HashSet::new();
            for i in 0..300 {
                loop {
                    match a.send(&to, "n", &i.to_string()).await {
                        Ok(id) => {
                            ids.insert(id);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (from, to_node) = migrate_slot_of(&inbox, None).await;
    let ids = sender.await.unwrap();
    let (got, _) = r::receive_ids(&mut b, ids.len(), Duration::from_secs(60)).await;
    // Put the slot back, so the shared cluster keeps its layout.
    migrate_slot_of(&inbox, Some(from.clone())).await;
    assert_eq!(
        ids.difference(&got).count(),
        0,
        "lost messages while the inbox moved from {from} to {to_node}"
    );
}

/// Moves the slot of `key` to another master (or to `target`), with its keys, the way
/// `redis-cli --cluster reshard` does; returns (from, to) as host:port.
async fn migrate_slot_of(key: &str, target: Option<String>) -> (String, String) {
    let nodes: Vec<String> = r::cluster_urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_string())
        .collect();
    let node = |addr: &str| {
        let addr = addr.to_string();
        async move {
            let client =
                ::redis::Client::open(format!("redis://:{}@{addr}", r::password())).unwrap();
            client.get_multiplexed_async_connection().await.unwrap()
        }
    };
    let mut any = node(&nodes[0]).await;
    let slot: i64 = ::redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut any)
        .await
        .unwrap();
    // Who owns it now, and the node ids.
    let mut ids = std::collections::HashMap::new();
    let mut owner = String::new();
    for addr in &nodes {
        let mut c = node(addr).await;
        let id: String = ::redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut c)
            .await
            .unwrap();
        let keys: i64 = ::redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query_async(&mut c)
            .await
            .unwrap();
        let shards: String = ::redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .unwrap();
        if shards
            .lines()
            .any(|l| l.contains("myself") && l.split_whitespace().skip(8).any(|r| slot_in(r, slot)))
        {
            owner = addr.clone();
        }
        let _ = keys;
        ids.insert(addr.clone(), id);
    }
    let dest = target.unwrap_or_else(|| nodes.iter().find(|n| **n != owner).unwrap().clone());
    let (mut src, mut dst) = (node(&owner).await, node(&dest).await);
    let _: () = ::redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(&ids[&owner])
        .query_async(&mut dst)
        .await
        .unwrap();
    let _: () = ::redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("MIGRATING")
        .arg(&ids[&dest])
        .query_async(&mut src)
        .await
        .unwrap();
    let (host, port) = dest.split_once(':').unwrap();
    loop {
        let keys: Vec<String> = ::redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: ::redis::Value = ::redis::cmd("MIGRATE")
            .arg(host)
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("AUTH")
            .arg(r::password())
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .unwrap();
    }
    for addr in &nodes {
        let mut c = node(addr).await;
        let _: () = ::redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&ids[&dest])
            .query_async(&mut c)
            .await
            .unwrap();
    }
    (owner, dest)
}

fn slot_in(range: &str, slot: i64) -> bool {
    match range.split_once('-') {
        Some((a, b)) => {
            a.parse::<i64>().is_ok_and(|a| a <= slot) && b.parse::<i64>().is_ok_and(|b| slot <= b)
        }
        None => range.parse::<i64>() == Ok(slot),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_the_old_password_once_and_deletion_removes_user_and_streams() {
    let (client, ns) = setup("msg-lifecycle").await;
    let _c = controller(&ns.name, Mode::Standalone, &[]);
    agent(&client, &ns.name, "alice", json!({})).await;
    let bob = agent(&client, &ns.name, "bob", json!({})).await;
    let keys = bob.status.clone().unwrap().messaging.unwrap();
    let mut admin = Mode::Standalone.admin().await;
    let first = r::credentials(&client, &ns.name, "bob").await;
    let auth = |creds: Credentials| async move {
        let mut c = r::as_agent(&creds).await;
        ::redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    };
    assert!(auth(first.clone()).await);

    // A tenant writing its own password into the Secret does not get it adopted.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"stringData": {"redis-password": "chosen-by-tenant"}});
    secrets
        .patch(
            "bob-identity",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let agents: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    let poke = json!({"metadata": {"annotations": {"test/poke": "1"}}});
    agents
        .patch("bob", &PatchParams::default(), &Patch::Merge(&poke))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the Secret to hold a password Redis accepts",
        || async {
            let c = r::credentials(&client, &ns.name, "bob").await;
            c.password != "chosen-by-tenant" && auth(c).await
        },
    )
    .await;
    let mut tenant = first.clone();
    tenant.password = "chosen-by-tenant".into();
    let tried = agentry::messaging::conn::Target {
        urls: tenant.endpoint.urls.clone(),
        cluster: false,
        username: Some(tenant.endpoint.user.clone()),
        password: Some(tenant.password.clone()),
    };
    let mut c = tried.connect().await.unwrap();
    assert!(
        ::redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_err(),
        "the tenant's password was adopted"
    );

    // Certificate rotation (revoke) rotates the password; the previous one stays valid.
    let second = r::credentials(&client, &ns.name, "bob").await;
    let revoke = json!({"metadata": {"annotations": {"agentry.dev/revoke": "superseded"}}});
    agents
        .patch("bob", &PatchParams::default(), &Patch::Merge(&revoke))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a new password", || async {
        r::credentials(&client, &ns.name, "bob").await.password != second.password
    })
    .await;
    let third = r::credentials(&client, &ns.name, "bob").await;
    assert!(auth(third.clone()).await, "the new password works");
    assert!(
        auth(second.clone()).await,
        "the previous password works until the next rotation"
    );

    // Deleting the Agent removes its user and its streams.
    agents
        .delete("bob", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "bob to be gone", || async {
        agents.get_opt("bob").await.ok().flatten().is_none()
    })
    .await;
    let user: ::redis::Value = ::redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&keys.user)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(user, ::redis::Value::Nil);
    for key in [&keys.inbox, &keys.outbox, &keys.dead_letters] {
        let n: i64 = ::redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(n, 0, "{key} left behind");
    }
    assert!(!auth(third).await);

    // Turning messaging off does the same, and clears the status.
    let alice = agents
        .get("alice")
        .await
        .unwrap()
        .status
        .unwrap()
        .messaging
        .unwrap();
    let off = json!({"spec": {"messaging": {"enabled": false}}});
    agents
        .patch("alice", &PatchParams::default(), &Patch::Merge(&off))
        .await
        .unwrap();
    wait_agent(
        &client,
        &ns.name,
        "alice",
        Duration::from_secs(30),
        "messaging released",
        |a| a.status.as_ref().is_some_and(|s| s.messaging.is_none()),
    )
    .await;
    let user: ::redis::Value = ::redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&alice.user)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(user, ::redis::Value::Nil);
}
