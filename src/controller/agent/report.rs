//! What a step of the Agent pipeline reports: its condition (typed reason), the Events it wants
//! published, and when it wants to run again. `status::compute` turns reports into the status.

use std::time::Duration;

use kube::runtime::events::EventType;

/// A condition's status as a step sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    True,
    False,
    Unknown,
    /// The part is not enabled: the condition is removed.
    Absent,
}

/// An Event a step wants published on the Agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            action,
            message: message.into(),
        }
    }
    pub fn warning(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_: EventType::Warning,
            reason,
            action,
            message: message.into(),
        }
    }
}

/// One step's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The condition type it owns; None for checks that only gate Ready (validation).
    pub condition: Option<&'static str>,
    pub level: Level,
    pub reason: &'static str,
    pub message: String,
    /// Ready needs this condition True.
    pub required: bool,
    /// Cannot progress until the Agent (or what it depends on) changes: kstatus Stalled.
    pub stalled: bool,
    pub events: Vec<Note>,
    /// When the step wants to run again (renewals); None: no wish.
    pub requeue_after: Option<Duration>,
}

impl Report {
    /// A required condition, True.
    pub fn ok(condition: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            condition: Some(condition),
            level: Level::True,
            reason,
            message: message.into(),
            required: true,
            stalled: false,
            events: Vec::new(),
            requeue_after: None,
        }
    }

    /// A required condition, False: progress is expected without a change (rollout, retry).
    pub fn pending(
        condition: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            level: Level::False,
            ..Self::ok(condition, reason, message)
        }
    }

    /// Cannot progress until something changes (invalid spec, refused permission, name taken).
    pub fn stalled(
        condition: Option<&'static str>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        let message = message.into();
        Self {
            condition,
            level: Level::False,
            reason,
            events: vec![Note::warning(reason, "Validate", message.clone())],
            stalled: true,
            required: true,
            message,
            requeue_after: None,
        }
    }

    /// An optional part's condition (not required for Ready).
    pub fn optional(
        condition: &'static str,
        level: Level,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            level,
            required: false,
            ..Self::ok(condition, reason, message)
        }
    }

    pub fn with_events(mut self, events: Vec<Note>) -> Self {
        self.events = events;
        self
    }

    pub fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue_after = Some(after);
        self
    }
}
