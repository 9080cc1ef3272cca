//! `outpost check-upstream` as an administrator runs it: against another
//! outpost as the upstream (STARTTLS with its self-signed certificate,
//! AUTH), nothing listening, and a wrong password.

mod common;

use common::{free_port, Gateway};

fn check(g: &Gateway) -> (i32, String) {
    let out = g.cli(&["check-upstream"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn an_untrusted_certificate_is_explained_then_trusted_with_ca_file() {
    let hub = Gateway::start("");
    let g = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"required\"\ntls_name = \"localhost\"\n",
        hub.relay
    ));
    let (code, text) = check(&g);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("ok    connect"), "{text}");
    assert!(text.contains("STARTTLS"), "{text}");
    assert!(
        text.contains("FAIL") && text.contains("not signed by a trusted CA"),
        "{text}"
    );
    assert!(text.contains("upstream.ca_file"), "{text}");

    let config = std::fs::read_to_string(&g.config_path).unwrap();
    let config = config.replace(
        "tls_name = \"localhost\"\n",
        &format!(
            "tls_name = \"localhost\"\nca_file = \"{}\"\n",
            hub.path("cert.pem").display()
        ),
    );
    std::fs::write(&g.config_path, config).unwrap();
    let (code, text) = check(&g);
    assert_eq!(code, 0, "{text}");
    for want in [
        "ok    DNS        127.0.0.1:",
        "ok    greeting   220",
        "ok    EHLO       PIPELINING CHUNKING",
        "ok    STARTTLS   TLSv1.3",
        "ok    cert       for gw.test, localhost, issued by",
        "ok    MAIL       MAIL FROM:<> 250",
        "takes mail from this gateway",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
    // Nothing was queued at the upstream.
    assert!(hub.queue().is_empty());
}

#[test]
fn nothing_listening_is_a_link_problem() {
    let g = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"none\"\n",
        free_port()
    ));
    let (code, text) = check(&g);
    assert_eq!(code, 75, "{text}");
    assert!(
        text.contains("FAIL") && text.contains("cannot connect"),
        "{text}"
    );
    assert!(text.contains("fix:") && text.contains("firewall"), "{text}");
}

#[test]
fn a_wrong_password_names_the_keys_to_fix() {
    let hub = Gateway::start("");
    hub.add_user("branch7", "right");
    let secret = hub.path("branch7.secret");
    std::fs::write(&secret, "wrong\n").unwrap();
    let g = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"opportunistic\"\nallow_plaintext_auth = true\nusername = \"branch7\"\npassword_file = \"{}\"\n",
        hub.relay,
        secret.display()
    ));
    let (code, text) = check(&g);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("authentication at"), "{text}");
    assert!(text.contains("upstream.password_file"), "{text}");
    // With the right one: AUTH passes.
    std::fs::write(&secret, "right\n").unwrap();
    let (code, text) = check(&g);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok    AUTH       as branch7"), "{text}");
}
