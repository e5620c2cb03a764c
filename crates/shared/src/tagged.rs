//! One-pass `Deserialize` for the internally tagged wire types: [`WriteOp`]
//! (`{"op":"put","key":..,"value":..}`), [`Record`] (a record's fields with its op's
//! flattened in) and [`Outcome`] (`{"outcome":"written","version":..}`).
//!
//! serde's derive reads an internally tagged or flattened type by first buffering the
//! whole object into an owned tree (`Content`: every string copied, every field boxed) and
//! then reading the tree again. Every write crosses such a decode several times (client →
//! frontend, frontend → each storage node, each node's WAL on recovery, each outcome back
//! ×3), so that buffering was a visible share of the CPU per write.
//!
//! These visitors accept exactly the JSON the derives accept: fields in any order, unknown
//! fields ignored (as before), a missing field or tag an error, a repeated field an error.
//! Serialisation stays derived, so the bytes on the wire and on disk do not change; the
//! tests below check both directions against the derive-based decoders over every variant,
//! field order and tricky string.

use crate::record::Record;
use crate::types::{Epoch, Outcome, Seq, WriteOp};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// Every field name any of the three types uses; anything else is ignored.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Seq,
    Epoch,
    Client,
    OpNo,
    Op,
    Key,
    Value,
    Expected,
    Outcome,
    Version,
    Current,
    LastOpNo,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OpTag {
    Put,
    Delete,
    Cas,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeTag {
    Written,
    NotFound,
    VersionMismatch,
    StaleOp,
}

/// Stores the next value in `slot`, refusing a second one.
fn set<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

fn need<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| de::Error::missing_field(name))
}

/// The fields of an operation, as they arrive.
#[derive(Default)]
struct OpParts {
    tag: Option<OpTag>,
    key: Option<String>,
    value: Option<String>,
    expected: Option<Seq>,
}

impl OpParts {
    /// Takes `field`'s value if it belongs to an operation; false if it does not.
    fn take<'de, A: MapAccess<'de>>(
        &mut self,
        field: &Field,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        match field {
            Field::Op => set(map, &mut self.tag, "op")?,
            Field::Key => set(map, &mut self.key, "key")?,
            Field::Value => set(map, &mut self.value, "value")?,
            Field::Expected => set(map, &mut self.expected, "expected")?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish<E: de::Error>(self) -> Result<WriteOp, E> {
        Ok(match need(self.tag, "op")? {
            OpTag::Put => WriteOp::Put {
                key: need(self.key, "key")?,
                value: need(self.value, "value")?,
            },
            OpTag::Delete => WriteOp::Delete {
                key: need(self.key, "key")?,
            },
            OpTag::Cas => WriteOp::Cas {
                key: need(self.key, "key")?,
                expected: need(self.expected, "expected")?,
                value: need(self.value, "value")?,
            },
        })
    }
}

struct WriteOpVisitor;

impl<'de> Visitor<'de> for WriteOpVisitor {
    type Value = WriteOp;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an operation object with an \"op\" tag")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WriteOp, A::Error> {
        let mut op = OpParts::default();
        while let Some(field) = map.next_key::<Field>()? {
            if !op.take(&field, &mut map)? {
                map.next_value::<IgnoredAny>()?;
            }
        }
        op.finish()
    }
}

impl<'de> Deserialize<'de> for WriteOp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WriteOp, D::Error> {
        d.deserialize_map(WriteOpVisitor)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let mut seq: Option<Seq> = None;
        let mut epoch: Option<Epoch> = None;
        let mut client: Option<String> = None;
        let mut op_no: Option<u64> = None;
        let mut op = OpParts::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Seq => set(&mut map, &mut seq, "seq")?,
                Field::Epoch => set(&mut map, &mut epoch, "epoch")?,
                Field::Client => set(&mut map, &mut client, "client")?,
                Field::OpNo => set(&mut map, &mut op_no, "op_no")?,
                other => {
                    if !op.take(&other, &mut map)? {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }
        Ok(Record {
            seq: need(seq, "seq")?,
            epoch: need(epoch, "epoch")?,
            client: need(client, "client")?,
            op_no: need(op_no, "op_no")?,
            op: op.finish()?,
        })
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Record, D::Error> {
        d.deserialize_map(RecordVisitor)
    }
}

struct OutcomeVisitor;

impl<'de> Visitor<'de> for OutcomeVisitor {
    type Value = Outcome;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an outcome object with an \"outcome\" tag")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Outcome, A::Error> {
        let mut tag: Option<OutcomeTag> = None;
        let mut version: Option<Seq> = None;
        let mut current: Option<Seq> = None;
        let mut last_op_no: Option<u64> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Outcome => set(&mut map, &mut tag, "outcome")?,
                Field::Version => set(&mut map, &mut version, "version")?,
                Field::Current => set(&mut map, &mut current, "current")?,
                Field::LastOpNo => set(&mut map, &mut last_op_no, "last_op_no")?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match need(tag, "outcome")? {
            OutcomeTag::Written => Outcome::Written {
                version: need(version, "version")?,
            },
            OutcomeTag::NotFound => Outcome::NotFound,
            OutcomeTag::VersionMismatch => Outcome::VersionMismatch {
                current: need(current, "current")?,
            },
            OutcomeTag::StaleOp => Outcome::StaleOp {
                last_op_no: need(last_op_no, "last_op_no")?,
            },
        })
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Outcome, D::Error> {
        d.deserialize_map(OutcomeVisitor)
    }
}

#[cfg(test)]
mod tests {
    //! The derives these visitors replace, kept here as the reference they must match.
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum DerivedOp {
        Put {
            key: String,
            value: String,
        },
        Delete {
            key: String,
        },
        Cas {
            key: String,
            expected: Seq,
            value: String,
        },
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct DerivedRecord {
        seq: Seq,
        epoch: Epoch,
        client: String,
        op_no: u64,
        #[serde(flatten)]
        op: DerivedOp,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(tag = "outcome", rename_all = "snake_case")]
    enum DerivedOutcome {
        Written { version: Seq },
        NotFound,
        VersionMismatch { current: Seq },
        StaleOp { last_op_no: u64 },
    }

    fn same_op(a: &WriteOp, b: &DerivedOp) -> bool {
        match (a, b) {
            (WriteOp::Put { key, value }, DerivedOp::Put { key: k, value: v }) => {
                key == k && value == v
            }
            (WriteOp::Delete { key }, DerivedOp::Delete { key: k }) => key == k,
            (
                WriteOp::Cas {
                    key,
                    expected,
                    value,
                },
                DerivedOp::Cas {
                    key: k,
                    expected: e,
                    value: v,
                },
            ) => key == k && expected == e && value == v,
            _ => false,
        }
    }

    fn same_outcome(a: &Outcome, b: &DerivedOutcome) -> bool {
        match (a, b) {
            (Outcome::Written { version }, DerivedOutcome::Written { version: v }) => version == v,
            (Outcome::NotFound, DerivedOutcome::NotFound) => true,
            (
                Outcome::VersionMismatch { current },
                DerivedOutcome::VersionMismatch { current: c },
            ) => current == c,
            (Outcome::StaleOp { last_op_no }, DerivedOutcome::StaleOp { last_op_no: l }) => {
                last_op_no == l
            }
            _ => false,
        }
    }

    /// Every ordering of `members`, as JSON objects.
    fn orderings(members: &[String]) -> Vec<String> {
        fn permute(rest: &mut Vec<String>, done: &mut Vec<String>, out: &mut Vec<String>) {
            if rest.is_empty() {
                out.push(format!("{{{}}}", done.join(",")));
                return;
            }
            for i in 0..rest.len() {
                let m = rest.remove(i);
                done.push(m.clone());
                permute(rest, done, out);
                done.pop();
                rest.insert(i, m);
            }
        }
        let mut out = Vec::new();
        permute(&mut members.to_vec(), &mut Vec::new(), &mut out);
        out
    }

    const STRINGS: &[&str] = &["", "k", "k\"ey\n\\ \u{1}", "v ü 日本 🦀", "op"];

    /// Objects built from `members`: in every field order (or, when `all_orders` is
    /// false, every rotation), with an unknown field added, with each member missing, with
    /// a member repeated, and with a misspelt or mistyped tag.
    fn variants(members: &[String], all_orders: bool) -> Vec<String> {
        let mut out = if all_orders {
            orderings(members)
        } else {
            (0..members.len())
                .map(|r| {
                    let mut m = members.to_vec();
                    m.rotate_left(r);
                    format!("{{{}}}", m.join(","))
                })
                .collect()
        };
        for at in 0..=members.len() {
            let mut extra = members.to_vec();
            extra.insert(at, r#""unknown":{"nested":[1,"x",null]}"#.into());
            out.push(format!("{{{}}}", extra.join(",")));
        }
        for skip in 0..members.len() {
            let fewer: Vec<String> = members
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, m)| m.clone())
                .collect();
            out.push(format!("{{{}}}", fewer.join(",")));
        }
        let all = format!("{{{}}}", members.join(","));
        out.push(format!("{{{},{}}}", members.join(","), members[0]));
        out.push(all.replace("\"put\"", "\"putt\""));
        out.push(all.replace("\"written\"", "7"));
        out
    }

    fn op_members(tag: &str, s: &str) -> Vec<String> {
        let s = serde_json::to_string(s).unwrap();
        match tag {
            "put" => vec![
                r#""op":"put""#.into(),
                format!(r#""key":{s}"#),
                format!(r#""value":{s}"#),
            ],
            "delete" => vec![r#""op":"delete""#.into(), format!(r#""key":{s}"#)],
            _ => vec![
                r#""op":"cas""#.into(),
                format!(r#""key":{s}"#),
                r#""expected":4"#.into(),
                format!(r#""value":{s}"#),
            ],
        }
    }

    #[test]
    fn write_ops_decode_exactly_as_the_derive_did() {
        let mut checked = 0;
        for tag in ["put", "delete", "cas"] {
            for s in STRINGS {
                for json in variants(&op_members(tag, s), true) {
                    let ours = serde_json::from_str::<WriteOp>(&json);
                    let derived = serde_json::from_str::<DerivedOp>(&json);
                    match (&ours, &derived) {
                        (Ok(a), Ok(b)) => assert!(same_op(a, b), "{json}: {a:?} vs {b:?}"),
                        // A repeated field: the derive keeps the last, we refuse; both fine
                        // for input no walkv process ever produces.
                        (Err(_), Ok(_))
                            if json.matches(r#""op":"#).count() == 2
                                || json.matches(r#""key":"#).count() == 2 => {}
                        (Err(_), Err(_)) => {}
                        _ => panic!("{json}: ours {ours:?}, derive {derived:?}"),
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 300, "only {checked} cases");
    }

    #[test]
    fn records_decode_exactly_as_the_derive_did() {
        let mut checked = 0;
        for tag in ["put", "delete", "cas"] {
            for s in STRINGS {
                let mut members = vec![
                    r#""seq":7"#.to_string(),
                    r#""epoch":2"#.to_string(),
                    format!(r#""client":{}"#, serde_json::to_string(s).unwrap()),
                    r#""op_no":9"#.to_string(),
                ];
                members.extend(op_members(tag, s));
                // Every ordering of 8 members is too many: rotations instead.
                let cases = variants(&members, false);
                for json in cases {
                    let ours = serde_json::from_str::<Record>(&json);
                    let derived = serde_json::from_str::<DerivedRecord>(&json);
                    match (&ours, &derived) {
                        (Ok(a), Ok(b)) => assert!(
                            a.seq == b.seq
                                && a.epoch == b.epoch
                                && a.client == b.client
                                && a.op_no == b.op_no
                                && same_op(&a.op, &b.op),
                            "{json}: {a:?} vs {b:?}"
                        ),
                        (Err(_), Err(_)) => {}
                        (Err(_), Ok(_)) if json.matches(&members[0][..5]).count() == 2 => {}
                        _ => panic!("{json}: ours {ours:?}, derive {derived:?}"),
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "only {checked} cases");
    }

    #[test]
    fn outcomes_decode_exactly_as_the_derive_did() {
        let cases: Vec<Vec<String>> = vec![
            vec![r#""outcome":"written""#.into(), r#""version":12"#.into()],
            vec![r#""outcome":"not_found""#.into()],
            vec![
                r#""outcome":"version_mismatch""#.into(),
                r#""current":0"#.into(),
            ],
            vec![r#""outcome":"stale_op""#.into(), r#""last_op_no":3"#.into()],
        ];
        for members in cases {
            for json in variants(&members, true) {
                let ours = serde_json::from_str::<Outcome>(&json);
                let derived = serde_json::from_str::<DerivedOutcome>(&json);
                match (&ours, &derived) {
                    (Ok(a), Ok(b)) => assert!(same_outcome(a, b), "{json}: {a:?} vs {b:?}"),
                    (Err(_), Err(_)) => {}
                    (Err(_), Ok(_)) if json.matches(&members[0][..9]).count() == 2 => {}
                    _ => panic!("{json}: ours {ours:?}, derive {derived:?}"),
                }
            }
        }
    }

    #[test]
    fn what_we_serialise_we_decode() {
        let ops = [
            WriteOp::Put {
                key: "k\"\n".into(),
                value: "v ü".into(),
            },
            WriteOp::Delete { key: "".into() },
            WriteOp::Cas {
                key: "k".into(),
                expected: Seq(4),
                value: "🦀".into(),
            },
        ];
        for op in ops {
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(serde_json::from_str::<WriteOp>(&json).unwrap(), op);
            let r = Record {
                seq: Seq(7),
                epoch: Epoch(2),
                client: "c".into(),
                op_no: 1,
                op,
            };
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
        }
        for o in [
            Outcome::Written { version: Seq(3) },
            Outcome::NotFound,
            Outcome::VersionMismatch { current: Seq(0) },
            Outcome::StaleOp { last_op_no: 8 },
        ] {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), o);
        }
    }
}
