//! The served models by name, and the default one.

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::error::ServerError;

/// Every loaded engine, by model name.
pub struct Models {
    engines: BTreeMap<String, Engine>,
    default: String,
}

impl Models {
    pub fn new(engines: BTreeMap<String, Engine>, default: String) -> Self {
        Self { engines, default }
    }

    /// The engine for `name`; empty selects the default model.
    pub fn get(&self, name: &str) -> Result<&Engine, ServerError> {
        let name = if name.is_empty() { &self.default } else { name };
        self.engines
            .get(name)
            .ok_or_else(|| ServerError::ModelNotFound(name.to_string()))
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn iter(&self) -> impl Iterator<Item = &Engine> {
        self.engines.values()
    }

    /// Stops every model thread (see `Engine::stop`), all at once. Returns
    /// whether all of them ended within `timeout`.
    pub async fn stop(&self, timeout: std::time::Duration) -> bool {
        let stops = self.engines.values().map(|e| e.stop(timeout));
        futures::future::join_all(stops)
            .await
            .into_iter()
            .all(|s| s)
    }
}
