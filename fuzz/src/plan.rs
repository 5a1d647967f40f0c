//! Plan files (`afetm-agent --plan`, `afetm-analyzer set-plan`): `PlanFile::parse` on any text.
//!
//! What must hold: a plan that parses survives the trip the analyzer makes it take (to the
//! protobuf `Plan` and back) and its own JSON parses again to the same points and target.

use afetm_proto::plan::PlanFile;

/// One input: see the module doc.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(plan) = PlanFile::parse(text) else { return };
    let json = serde_json::to_string(&plan).expect("a plan serializes");
    let again = PlanFile::parse(&json).expect("a parsed plan's own JSON parses");
    assert_eq!((&again.target, &again.points, again.version), (&plan.target, &plan.points, plan.version));
    let wire = PlanFile::from_proto(&plan.to_proto()).expect("a parsed plan survives the wire");
    assert_eq!(wire.points, plan.points);
}
