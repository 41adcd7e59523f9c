//! Amazon SES notifications delivered by mail through SNS: a JSON body with
//! `notificationType` Bounce, Complaint or Delivery.
//!
//! Owns unwrapping the SNS envelope (the notification may sit as a string in
//! its `Message` field) and mapping the JSON to findings.

use serde_json::Value;

use super::{text, Ctx, Finding, Kind};
use crate::classify::{self, Class};

/// Reads an SES notification from the body; `None` when there is none.
pub(crate) fn parse(ctx: &Ctx<'_>) -> Option<(Kind, Vec<Finding>)> {
    if !ctx.notice.contains("notificationType") {
        return None;
    }
    let json = notification(ctx.notice)?;
    match json.get("notificationType")?.as_str()? {
        "Bounce" => Some(bounce(&json)),
        "Complaint" => Some(complaint(&json)),
        "Delivery" => Some(delivery(&json)),
        _ => None,
    }
}

/// The notification object, unwrapped from SNS when needed.
fn notification(body: &str) -> Option<Value> {
    // Mail transport wraps long lines as "!\n " inside the JSON: undo it.
    let joined = body.replace("!\r\n ", "").replace("!\n ", "");
    let start = joined.find('{')?;
    let end = joined.rfind('}')?;
    let mut stream =
        serde_json::Deserializer::from_str(joined.get(start..=end)?).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    if value.get("notificationType").is_some() {
        return Some(value);
    }
    let inner = value.get("Message")?.as_str()?;
    serde_json::from_str(inner).ok()
}

/// Findings of a Bounce notification.
fn bounce(json: &Value) -> (Kind, Vec<Finding>) {
    let b = &json["bounce"];
    let permanent = b["bounceType"].as_str() == Some("Permanent");
    let subtype = b["bounceSubType"].as_str().unwrap_or("");
    let mut out = Vec::new();
    for r in b["bouncedRecipients"].as_array().into_iter().flatten() {
        let diag = text::strip_type(r["diagnosticCode"].as_str().unwrap_or("")).to_string();
        let status = r["status"]
            .as_str()
            .map(str::to_string)
            .or_else(|| text::last_status(&diag));
        let mut reason = classify::reason(&diag, status.as_deref());
        // SES names some reasons itself when the diagnostic is empty.
        if diag.is_empty() {
            reason = match subtype {
                "Suppressed" | "OnAccountSuppressionList" => "suppressed",
                "MailboxFull" => "mailboxfull",
                "MessageTooLarge" => "mesgtoobig",
                "NoEmail" => "userunknown",
                _ => reason,
            };
        }
        let mut class = classify::class_of(reason);
        if !permanent && class == Class::Hard {
            class = Class::Soft;
        }
        let line = text::one_line(&diag);
        out.push(Finding {
            recipient: r["emailAddress"].as_str().and_then(text::first_address),
            status,
            class,
            reason: reason.into(),
            feedback_type: None,
            diagnostic: (!line.is_empty()).then_some(line),
            remote_mta: b["remoteMtaIp"].as_str().map(str::to_string),
        });
    }
    (Kind::Bounce, out)
}

/// Findings of a Complaint notification.
fn complaint(json: &Value) -> (Kind, Vec<Finding>) {
    let c = &json["complaint"];
    let kind = c["complaintFeedbackType"]
        .as_str()
        .unwrap_or("abuse")
        .to_string();
    let out = c["complainedRecipients"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Finding {
            recipient: r["emailAddress"].as_str().and_then(text::first_address),
            status: None,
            class: Class::Other,
            reason: "feedback".into(),
            feedback_type: Some(kind.clone()),
            diagnostic: None,
            remote_mta: None,
        })
        .collect();
    (Kind::Complaint, out)
}

/// Findings of a Delivery notification.
fn delivery(json: &Value) -> (Kind, Vec<Finding>) {
    let d = &json["delivery"];
    let reply = d["smtpResponse"].as_str().unwrap_or("");
    let out = d["recipients"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Finding {
            recipient: r.as_str().and_then(text::first_address),
            status: text::last_status(reply),
            class: Class::Other,
            reason: "delivered".into(),
            feedback_type: None,
            diagnostic: (!reply.is_empty()).then(|| text::one_line(reply)),
            remote_mta: d["reportingMTA"].as_str().map(str::to_string),
        })
        .collect();
    (Kind::Delivered, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_sns_and_reads_a_bounce() {
        let body = r#"{"Type":"Notification","Message":"{\"notificationType\":\"Bounce\",\"bounce\":{\"bounceType\":\"Permanent\",\"bouncedRecipients\":[{\"emailAddress\":\"a@example.com\",\"status\":\"5.1.1\",\"diagnosticCode\":\"smtp; 550 5.1.1 user unknown\"}]}}"}"#;
        let json = notification(body).expect("json");
        let (kind, found) = bounce(&json);
        assert_eq!(kind, Kind::Bounce);
        assert_eq!(found[0].recipient.as_deref(), Some("a@example.com"));
        assert_eq!(found[0].class, Class::Hard);
        assert_eq!(found[0].status.as_deref(), Some("5.1.1"));
    }
}
