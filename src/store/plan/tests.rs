//! The planning layer, tested directly: no database.

use super::*;
use crate::domain::LifecyclePolicy;
use crate::domain::{JobId, LeaseId};
use crate::store::AttemptOutcome;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_micros(secs * 1_000_000)
}

fn policy() -> LifecyclePolicy {
    let mut policy = LifecyclePolicy::default();
    policy.retry.max_retries = 2;
    policy.retry.jitter_fraction = 0.0;
    policy.timeouts.heartbeat = Duration::from_secs(30);
    policy
}

fn row(status: JobStatus, lease: Option<LeaseId>) -> Row {
    Row {
        status,
        lease_id: lease.map(|l| l.to_string()),
        retry_count: 0,
        result_received: false,
        execution_deadline: Some(at(600)),
        heartbeat_deadline: None,
    }
}

fn result(lease: Option<LeaseId>, outcome: AttemptOutcome, now: Timestamp) -> SubmitResultParams {
    SubmitResultParams {
        job_id: JobId::new_random(),
        lease_id: lease,
        outcome,
        policy: policy(),
        jitter: 0.0,
        now,
    }
}

fn success() -> AttemptOutcome {
    AttemptOutcome::Success {
        content: "text".into(),
        metadata: serde_json::json!({}),
        processing_time: None,
    }
}

fn failure(retryable: bool) -> AttemptOutcome {
    AttemptOutcome::Failure {
        error_message: "boom".into(),
        retryable,
    }
}

fn steps(history: &[&HistoryStep]) -> Vec<(Option<JobStatus>, JobStatus, Actor, String)> {
    history
        .iter()
        .map(|s| (s.from, s.to, s.actor, s.reason.clone()))
        .collect()
}

use JobStatus::*;

#[test]
fn a_success_in_time_completes_with_its_reason_and_a_hand_off() {
    let lease = LeaseId::new_random();
    let plan = plan_result(
        &row(Processing, Some(lease)),
        &result(Some(lease), success(), at(5)),
    )
    .unwrap();
    assert_eq!(plan.expected_status, Processing);
    assert_eq!(
        plan.expected_lease,
        LeaseCondition::Is(Some(lease.to_string()))
    );
    assert_eq!(plan.expected_retry_count, Some(0));
    assert_eq!(plan.status(), Completed);
    assert_eq!(plan.handoff(), Some(HandoffKind::Completed));
    assert_eq!(
        steps(&plan.history()),
        vec![(
            Some(Processing),
            Completed,
            Actor::Worker,
            reasons::WORKER_SUCCESS.to_owned()
        )]
    );
    // The write without a read plans the same change, on the in-time conditions.
    let fast = plan_in_time_success(&result(None, success(), at(5))).unwrap();
    assert_eq!(fast.change, plan.change);
    assert_eq!(
        (fast.expected_status, fast.expected_lease),
        (Processing, LeaseCondition::Any)
    );
    assert_eq!(
        plan_in_time_success(&result(None, failure(true), at(5))),
        None
    );
}

#[test]
fn a_late_success_completes_a_retrying_job_with_its_own_reason() {
    let lease = LeaseId::new_random();
    let plan = plan_result(
        &row(Retrying, Some(lease)),
        &result(Some(lease), success(), at(5)),
    )
    .unwrap();
    assert_eq!(plan.expected_status, Retrying);
    assert_eq!(
        steps(&plan.history()),
        vec![(
            Some(Retrying),
            Completed,
            Actor::Worker,
            reasons::LATE_SUCCESS.to_owned()
        )]
    );
    // Without the lease it cannot prove it ran that attempt.
    assert_eq!(
        plan_result(&row(Retrying, Some(lease)), &result(None, success(), at(5))),
        Err(StoreError::InvalidTransition { current: Retrying })
    );
}

#[test]
fn results_are_refused_for_stale_leases_and_jobs_not_running() {
    let lease = LeaseId::new_random();
    assert_eq!(
        plan_result(
            &row(Processing, Some(lease)),
            &result(Some(LeaseId::new_random()), success(), at(5))
        ),
        Err(StoreError::LeaseMismatch {
            current: Processing
        })
    );
    for status in [Pending, Completed, Failed, Timeout, Cancelled] {
        assert_eq!(
            plan_result(&row(status, Some(lease)), &result(None, success(), at(5))),
            Err(StoreError::InvalidTransition { current: status }),
            "{status}"
        );
    }
    let mut reported = row(Processing, Some(lease));
    reported.result_received = true;
    assert_eq!(
        plan_result(&reported, &result(Some(lease), success(), at(5))),
        Err(StoreError::InvalidTransition {
            current: Processing
        })
    );
}

#[test]
fn a_failure_with_retries_left_moves_on_to_retrying_with_both_reasons() {
    let lease = LeaseId::new_random();
    let plan = plan_result(
        &row(Processing, Some(lease)),
        &result(Some(lease), failure(true), at(10)),
    )
    .unwrap();
    let ResultChange::Failure(end) = &plan.change else {
        panic!("a failure plans an attempt end");
    };
    assert_eq!(
        (
            end.status,
            end.retry_count,
            end.available_at,
            end.deadline_at,
            end.completed_at
        ),
        (Retrying, Some(1), Some(at(70)), Some(at(70)), None)
    );
    assert_eq!(
        (end.handoff, end.retry_scheduled, end.error_message.as_str()),
        (None, true, "boom")
    );
    assert_eq!(
        steps(&plan.history()),
        vec![
            (Some(Processing), Failed, Actor::Worker, "boom".to_owned()),
            (
                Some(Failed),
                Retrying,
                Actor::Worker,
                retry_reason(1, 2, at(70))
            ),
        ]
    );
    assert_eq!(
        retry_reason(1, 2, at(70)),
        format!("automatic retry 1 of 2, claimable from {}", at(70))
    );
}

#[test]
fn a_failure_not_retryable_or_out_of_retries_is_final_and_handed_off() {
    let lease = LeaseId::new_random();
    let plan = plan_result(
        &row(Processing, Some(lease)),
        &result(None, failure(false), at(10)),
    )
    .unwrap();
    let ResultChange::Failure(end) = &plan.change else {
        panic!("a failure plans an attempt end");
    };
    assert_eq!(
        (
            end.status,
            end.retry_count,
            end.completed_at,
            end.deadline_at,
            end.handoff
        ),
        (
            Failed,
            Some(0),
            Some(at(10)),
            None,
            Some(HandoffKind::Failed)
        )
    );
    assert_eq!(
        steps(&plan.history()),
        vec![(
            Some(Processing),
            Failed,
            Actor::Worker,
            format!("boom{}", reasons::NOT_RETRYABLE_SUFFIX)
        )]
    );
    assert_eq!(end.history[0].reason, "boom (not retryable)");
    let mut exhausted = row(Processing, Some(lease));
    exhausted.retry_count = 2;
    let plan = plan_result(&exhausted, &result(None, failure(true), at(10))).unwrap();
    assert_eq!(
        (plan.status(), plan.handoff()),
        (Failed, Some(HandoffKind::Failed))
    );
    assert_eq!(plan.expected_retry_count, Some(2));
}

#[test]
fn heartbeats_move_the_heartbeat_deadline_only_for_the_running_attempt() {
    let lease = LeaseId::new_random();
    let params = |lease_id| HeartbeatParams {
        job_id: JobId::new_random(),
        lease_id,
        progress: None,
        message: None,
        timeouts: policy().timeouts,
        now: at(100),
    };
    let plan = plan_heartbeat(&row(Processing, Some(lease)), &params(lease)).unwrap();
    let HeartbeatPlan::Extend {
        expected_lease,
        expected_execution_deadline,
        deadlines,
        deadline_at,
        ..
    } = &plan
    else {
        panic!("a running attempt is extended");
    };
    assert_eq!(expected_lease, &lease.to_string());
    assert_eq!(
        (
            *expected_execution_deadline,
            deadlines.heartbeat,
            *deadline_at
        ),
        (at(600), Some(at(130)), at(130))
    );
    assert_eq!(plan.outcome().heartbeat_deadline, Some(at(130)));
    assert_eq!(
        plan_heartbeat(
            &row(Processing, Some(lease)),
            &params(LeaseId::new_random())
        ),
        Err(StoreError::LeaseMismatch {
            current: Processing
        })
    );
    let cancelled = plan_heartbeat(&row(Cancelled, Some(lease)), &params(lease)).unwrap();
    assert_eq!(cancelled, HeartbeatPlan::Cancelled);
    assert!(cancelled.outcome().cancelled);
    assert_eq!(
        plan_heartbeat(&row(Completed, Some(lease)), &params(lease)),
        Err(StoreError::InvalidTransition { current: Completed })
    );
    assert_eq!(
        heartbeat_not_applied(Some(Processing)),
        StoreError::DeadlinePassed
    );
    assert_eq!(
        heartbeat_not_applied(Some(Timeout)),
        StoreError::InvalidTransition { current: Timeout }
    );
    assert_eq!(heartbeat_not_applied(None), StoreError::NotFound);
}

#[test]
fn a_release_needs_the_current_lease_of_a_processing_attempt() {
    let lease = LeaseId::new_random();
    let params = |lease: LeaseId, reason: Option<&str>| ReleaseParams {
        job_id: JobId::new_random(),
        lease_id: lease,
        reason: reason.map(str::to_owned),
        now: at(100),
    };
    let plan = plan_release(&row(Processing, Some(lease)), &params(lease, None), 0).unwrap();
    assert_eq!(plan.expected_status, Processing);
    assert_eq!(plan.expected_lease, lease.to_string());
    assert_eq!(plan.status, Pending);
    assert_eq!(
        plan.history,
        HistoryStep::new(Some(Processing), Pending, Actor::Worker, reasons::RELEASE)
    );
    let said = plan_release(
        &row(Processing, Some(lease)),
        &params(lease, Some(" shutting down ")),
        MAX_RELEASES_PER_JOB - 1,
    )
    .unwrap();
    assert_eq!(
        said.history.reason,
        format!("{} (shutting down)", reasons::RELEASE)
    );
    assert_eq!(
        plan_release(
            &row(Processing, Some(lease)),
            &params(LeaseId::new_random(), None),
            0
        ),
        Err(StoreError::LeaseMismatch {
            current: Processing
        })
    );
    assert_eq!(
        plan_release(
            &row(Processing, Some(lease)),
            &params(lease, None),
            MAX_RELEASES_PER_JOB
        ),
        Err(StoreError::ReleaseLimitReached {
            limit: MAX_RELEASES_PER_JOB
        })
    );
    for status in [Cancelled, Completed, Failed, Timeout, Retrying, Pending] {
        assert_eq!(
            plan_release(&row(status, Some(lease)), &params(lease, None), 0),
            Err(StoreError::InvalidTransition { current: status }),
            "{status}"
        );
    }
    assert_eq!(
        release_not_applied(Some(Timeout)),
        StoreError::LeaseMismatch { current: Timeout }
    );
    assert_eq!(release_not_applied(None), StoreError::NotFound);
}

#[test]
fn cancelling_a_live_job_hands_off_and_a_finished_one_keeps_its_outcome() {
    let params = CancelParams {
        job_id: JobId::new_random(),
        reason: "operator".into(),
        now: at(50),
    };
    for status in [Pending, Processing, Retrying] {
        let plan = plan_cancel(&row(status, None), &params).unwrap();
        assert_eq!(
            (
                plan.expected_status,
                plan.status,
                plan.completed_at,
                plan.handoff
            ),
            (
                status,
                Cancelled,
                Some(at(50)),
                Some(HandoffKind::Cancelled)
            ),
            "{status}"
        );
        assert_eq!(
            steps(&[&plan.history]),
            vec![(Some(status), Cancelled, Actor::Admin, "operator".to_owned())]
        );
    }
    for status in [Completed, Failed, Timeout] {
        let plan = plan_cancel(&row(status, None), &params).unwrap();
        assert_eq!(
            (plan.status, plan.completed_at, plan.handoff),
            (Cancelled, None, None),
            "{status}: its outcome was handed off already"
        );
        assert_eq!(
            steps(&[&plan.history]),
            vec![(Some(status), Cancelled, Actor::Admin, "operator".to_owned())]
        );
    }
    assert_eq!(
        plan_cancel(&row(Cancelled, None), &params),
        Err(StoreError::InvalidTransition { current: Cancelled })
    );
}

#[test]
fn a_manual_retry_resets_the_budget_of_a_final_failure_only() {
    let params = ManualRetryParams {
        job_id: JobId::new_random(),
        now: at(80),
    };
    for status in [Failed, Timeout] {
        let mut failed = row(status, None);
        failed.retry_count = 2;
        let plan = plan_manual_retry(&failed, &params).unwrap();
        assert_eq!(
            (plan.status, plan.retry_count, plan.available_at),
            (Retrying, 0, at(80))
        );
        assert_eq!(
            steps(&[&plan.history]),
            vec![(
                Some(status),
                Retrying,
                Actor::Admin,
                reasons::MANUAL_RETRY.to_owned()
            )]
        );
    }
    for status in [Pending, Processing, Completed, Cancelled, Retrying] {
        assert_eq!(
            plan_manual_retry(&row(status, None), &params),
            Err(StoreError::InvalidTransition { current: status }),
            "{status}"
        );
    }
}

fn rescue_params(now: Timestamp) -> RescueParams {
    RescueParams {
        policy: policy(),
        limit: 10,
        jitter_seed: 7,
        now,
    }
}

#[test]
fn the_rescuer_times_out_pending_jobs_for_good() {
    let params = rescue_params(at(1000));
    let mut planner = RescuePlanner::new(&params);
    let plan = planner.plan(&row(Pending, None));
    let RescuePlan::PendingTimeout(end) = &plan else {
        panic!("a pending job past its deadline times out");
    };
    let reason = Expiry::Pending.reason();
    assert_eq!(
        (
            end.status,
            end.completed_at,
            end.retry_count,
            end.available_at,
            end.handoff
        ),
        (
            Timeout,
            Some(at(1000)),
            None,
            None,
            Some(HandoffKind::Failed)
        )
    );
    assert_eq!(
        steps(&end.history.iter().collect::<Vec<_>>()),
        vec![(Some(Pending), Timeout, Actor::Monitor, reason.to_owned())]
    );
    assert_eq!(end.error_message, reason);
    let mut report = RescueReport::default();
    plan.count(&mut report);
    assert_eq!(report.n_pending_timed_out, 1);
    assert_eq!(plan.expected_status(), Some(Pending));
}

#[test]
fn the_rescuer_times_out_attempts_by_execution_or_heartbeat_and_schedules_retries() {
    let lease = LeaseId::new_random();
    let params = rescue_params(at(600));
    let mut planner = RescuePlanner::new(&params);
    // Past the execution deadline.
    let plan = planner.plan(&row(Processing, Some(lease)));
    let RescuePlan::AttemptTimeout {
        expected_lease,
        expected_retry_count,
        end,
    } = &plan
    else {
        panic!("an expired attempt times out");
    };
    assert_eq!(
        (expected_lease.as_deref(), *expected_retry_count),
        (Some(lease.to_string().as_str()), 0)
    );
    assert_eq!(
        (end.status, end.retry_count, end.available_at),
        (Retrying, Some(1), Some(at(660)))
    );
    assert_eq!(
        steps(&end.history.iter().collect::<Vec<_>>()),
        vec![
            (
                Some(Processing),
                Timeout,
                Actor::Monitor,
                Expiry::Execution.reason().to_owned()
            ),
            (
                Some(Timeout),
                Retrying,
                Actor::Monitor,
                retry_reason(1, 2, at(660))
            ),
        ]
    );
    let mut report = RescueReport::default();
    plan.count(&mut report);
    assert_eq!(
        (report.n_attempts_timed_out, report.n_retries_scheduled),
        (1, 1)
    );

    // Past the heartbeat deadline only, with no retries left: a final timeout.
    let mut silent = row(Processing, Some(lease));
    silent.heartbeat_deadline = Some(at(500));
    silent.retry_count = 2;
    let params = rescue_params(at(550));
    let plan = RescuePlanner::new(&params).plan(&silent);
    let RescuePlan::AttemptTimeout { end, .. } = &plan else {
        panic!("a silent attempt times out");
    };
    assert_eq!(
        (end.status, end.handoff, end.completed_at),
        (Timeout, Some(HandoffKind::Failed), Some(at(550)))
    );
    assert_eq!(end.history[0].reason, Expiry::Heartbeat.reason());
    assert_eq!(end.history.len(), 1);
    let mut report = RescueReport::default();
    plan.count(&mut report);
    assert_eq!(
        (report.n_attempts_timed_out, report.n_retries_scheduled),
        (1, 0)
    );

    // Not expired yet (another deadline moved the row into the scan): nothing.
    let params = rescue_params(at(100));
    assert_eq!(
        RescuePlanner::new(&params).plan(&row(Processing, Some(lease))),
        RescuePlan::Skip
    );
}

#[test]
fn the_rescuer_makes_due_retries_claimable_and_clears_stray_deadlines() {
    let params = rescue_params(at(600));
    let mut planner = RescuePlanner::new(&params);
    let due = planner.plan(&row(Retrying, None));
    assert_eq!(due, RescuePlan::RetryDue);
    let mut report = RescueReport::default();
    due.count(&mut report);
    assert_eq!(report.n_retries_due, 1);
    for status in [Completed, Failed, Timeout, Cancelled] {
        assert_eq!(
            planner.plan(&row(status, None)),
            RescuePlan::ClearDeadline,
            "{status}"
        );
    }
}

#[test]
fn jitter_comes_from_the_pass_seed_and_only_shortens_the_backoff() {
    let mut jittery = rescue_params(at(600));
    jittery.policy.retry.jitter_fraction = 0.5;
    let plan = |params: &RescueParams| match RescuePlanner::new(params).plan(&row(Processing, None))
    {
        RescuePlan::AttemptTimeout { end, .. } => end.available_at.unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        plan(&jittery),
        plan(&jittery),
        "the same seed plans the same retry"
    );
    let retry_at = plan(&jittery);
    assert!(retry_at <= at(660) && retry_at >= at(630), "{retry_at}");
}

#[test]
fn cleanup_goes_status_by_status_within_its_budget_and_reports_orphans_once() {
    let params = CleanupParams {
        retention: RetentionPolicy::from_days(7, None),
        limit: 3,
        now: at(100 * 86_400),
    };
    let mut planner = CleanupPlanner::new(&params);
    let first = planner.next_batch().unwrap();
    assert_eq!(
        (first.status, first.cutoff, first.limit),
        (Completed, at(93 * 86_400), 3)
    );
    planner.deleted("/a".into());
    planner.deleted("/a".into());
    let second = planner.next_batch().unwrap();
    assert_eq!((second.status, second.limit), (Cancelled, 1));
    let third = planner.next_batch().unwrap();
    assert_eq!((third.status, third.cutoff), (Failed, at(86 * 86_400)));
    planner.deleted("/b".into());
    assert_eq!(planner.next_batch(), None, "the budget is spent");
    assert_eq!(
        planner.source_files_to_check(),
        vec!["/a".to_owned(), "/b".to_owned()],
        "each file once, after all deletions"
    );
    assert!(planner.source_files_to_check().is_empty());
    planner.orphaned("/a".into());
    planner.orphaned("/a".into());
    assert_eq!(
        planner.stale_creation_counters_before(),
        minute_of(at(98 * 86_400))
    );
    let report = planner.finish();
    assert_eq!(
        (report.n_deleted, report.orphaned_source_files),
        (3, vec!["/a".to_owned()])
    );

    let mut everything = CleanupPlanner::new(&CleanupParams {
        limit: 100,
        ..params
    });
    let statuses: Vec<JobStatus> =
        std::iter::from_fn(|| everything.next_batch().map(|b| b.status)).collect();
    assert_eq!(statuses, vec![Completed, Cancelled, Failed, Timeout]);
}

#[test]
fn claims_and_creation_have_their_reasons_and_windows_are_defined_once() {
    assert_eq!(
        created_step(),
        HistoryStep::new(None, Pending, Actor::Client, "created")
    );
    assert_eq!(
        claim_reason("gpu-1", 3),
        "claimed by worker gpu-1 (attempt 3)"
    );
    assert_eq!(
        claim_reason_template("gpu-1").replace(reasons::ATTEMPT_PLACEHOLDER, "3"),
        claim_reason("gpu-1", 3)
    );
    assert_eq!(claim_step(Retrying, "w", 2).from, Some(Retrying));
    assert_eq!(imported_step(Completed, "imported").actor, Actor::Admin);
    assert_eq!(
        created_recently_since(at(2 * 86_400)),
        minute_of(at(86_400))
    );
    assert_eq!(
        stale_creation_counters_before(at(3 * 86_400)),
        minute_of(at(86_400))
    );
    let timeouts = TimeoutPolicy::default();
    let audio = ContentType::parse("audio").unwrap();
    let (types, deadlines, other) =
        claim_deadline_table(&timeouts, &[audio.clone(), audio.clone()], at(0));
    assert_eq!(
        (types, deadlines, other),
        (vec![audio], vec![at(1800)], at(3600))
    );
    let (any, _, _) = claim_deadline_table(&timeouts, &[], at(0));
    assert_eq!(any.len(), timeouts.execution_by_type.len());
}

/// The invariant ARCHITECTURE.md states: only the planning layer decides a transition.
/// The backend files contain no history reason, no retry, timeout or transition-table
/// decision and no choice of a job status: they read rows, apply plans and report.
#[test]
fn backends_contain_no_lifecycle_policy() {
    let store = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut backend_files = Vec::new();
    let mut folders = vec![store.join("sqlite"), store.join("postgres")];
    for file in ["sqlite.rs", "postgres.rs"] {
        if store.join(file).exists() {
            backend_files.push(store.join(file));
        }
    }
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                backend_files.push(path);
            }
        }
    }
    assert!(
        backend_files.len() >= 2,
        "found the backend files: {backend_files:?}"
    );
    let forbidden: Vec<String> = [
        // History reasons. ("created" alone is also a column and a counter's name.)
        "'created')",
        ", 'created'",
        "\"created\")",
        reasons::WORKER_SUCCESS,
        reasons::LATE_SUCCESS,
        reasons::MANUAL_RETRY,
        reasons::RELEASE,
        reasons::NOT_RETRYABLE_SUFFIX.trim(),
        "claimed by worker",
        "automatic retry",
        Expiry::Pending.reason(),
        Expiry::Execution.reason(),
        Expiry::Heartbeat.reason(),
        // Lifecycle decisions.
        "judge_result",
        "after_failure",
        "can_move_to",
        "is_finished",
        ".expired(",
        "Expiry::",
        "AfterFailure",
        "for_final_status",
        "heartbeat_deadlines(",
        ".cutoff(",
        "backoff_delay",
        "86_400",
        // Choosing a status: every status a backend writes comes from a plan.
        "JobStatus::Pending",
        "JobStatus::Processing",
        "JobStatus::Completed",
        "JobStatus::Failed",
        "JobStatus::Timeout",
        "JobStatus::Cancelled",
        "JobStatus::Retrying",
        "SET status = '",
        "Actor::Client",
        "Actor::Worker",
        "Actor::Monitor",
        "Actor::Admin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut found = Vec::new();
    for file in &backend_files {
        let text = std::fs::read_to_string(file).unwrap();
        // The backends' own unit tests may name anything.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for needle in &forbidden {
            for (number, line) in code.lines().enumerate() {
                if line.contains(needle.as_str()) && !line.trim_start().starts_with("//") {
                    found.push(format!(
                        "{}:{}: {needle:?}: {}",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "lifecycle policy outside the planning layer:\n{}",
        found.join("\n")
    );
}
