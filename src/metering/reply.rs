//! Reading a script's table answer: `{status, values...}`.

use super::*;

pub(super) fn protocol(script: &'static str, detail: impl Into<String>) -> MeterError {
    MeterError::Protocol {
        script,
        detail: detail.into(),
    }
}

/// A script reply `{"status", value, ...}`.
pub(super) struct Reply {
    pub(super) script: &'static str,
    pub(super) status: String,
    pub(super) values: Vec<Value>,
}

impl Reply {
    pub(super) fn parse(script: &'static str, reply: Value) -> Result<Self, MeterError> {
        let Value::Array(items) = reply else {
            return Err(protocol(script, format!("not an array: {reply:?}")));
        };
        let mut items = items.into_iter();
        let status = match items.next() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Some(Value::SimpleString(s)) => s,
            other => return Err(protocol(script, format!("bad status {other:?}"))),
        };
        Ok(Self {
            script,
            status,
            values: items.collect(),
        })
    }

    pub(super) fn int(&self, i: usize) -> Result<i64, MeterError> {
        match self.values.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not an integer: {other:?}", self.status),
            )),
        }
    }

    pub(super) fn text(&self, i: usize) -> Result<String, MeterError> {
        match self.values.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not a string: {other:?}", self.status),
            )),
        }
    }

    /// A plan id: what seed.lua and sync.lua stored, so a malformed one
    /// means Redis holds something this gateway did not write.
    pub(super) fn plan(&self, i: usize) -> Result<PlanId, MeterError> {
        let text = self.text(i)?;
        PlanId::parse(&text).map_err(|e| {
            protocol(
                self.script,
                format!("{}: plan {text:?}: {}", self.status, e.why),
            )
        })
    }

    pub(super) fn bytes(&self, i: usize) -> Result<bytes::Bytes, MeterError> {
        match self.values.get(i) {
            Some(Value::BulkString(b)) => Ok(bytes::Bytes::copy_from_slice(b)),
            Some(Value::SimpleString(s)) => Ok(bytes::Bytes::copy_from_slice(s.as_bytes())),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not a string: {other:?}", self.status),
            )),
        }
    }

    /// `monthly, bonus, day_used, daily_limit` starting at value `i`.
    pub(super) fn balance(&self, i: usize) -> Result<Balance, MeterError> {
        let limit = self.int(i + 3)?;
        Ok(Balance {
            monthly: Credits::recorded(self.int(i)?),
            bonus: Credits::recorded(self.int(i + 1)?),
            day_used: Credits::recorded(self.int(i + 2)?),
            daily_limit: (limit >= 0).then(|| Credits::recorded(limit)),
        })
    }
}
