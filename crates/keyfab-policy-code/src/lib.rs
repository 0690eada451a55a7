//! Policy as code: a device maker's own rules, as a WebAssembly module that travels signed
//! inside the entitlement, runs in a sandbox at the site, and that HQ re-runs over the
//! audit log.
//!
//! Which API for which job:
//! - check and prepare a module (HQ before signing it, the site when importing it):
//!   [`PolicyModule::load`] — names what is wrong with a module that is refused;
//! - one decision: [`PolicyModule::evaluate`] with the request's [`Facts`] and the
//!   entitlement's [`ModuleState`]; the state is updated in place when the module
//!   decided, and left exactly as it was when the module failed.
//!
//! The module sees nothing but what the host API gives it (docs/POLICY-CODE.md): no
//! clock, no randomness, no floats, no WASI. Every evaluation starts from a fresh
//! instance with a fixed amount of fuel and a memory bound, so the same inputs give the
//! same verdict at the site and at HQ, and a module that loops, allocates without bound or
//! traps fails closed with [`Verdict::Error`].
#![forbid(unsafe_code)]

pub mod cases;
mod counters;
mod host;
mod state;

pub use counters::{CodeCounters, Counted};
pub use state::{ModuleState, MAX_STATE_ENTRIES, MAX_STATE_KEY_BYTES, MAX_STATE_VALUE_BYTES};

use host::Host;
use wasmi::{CompilationMode, Config, Engine, ExternType, Linker, Module, Store};

/// The import module name of every host function.
pub const HOST_MODULE: &str = "keyfab";
/// The function a module exports to decide: `() -> i32`, 0 allows, 1 denies.
pub const DECIDE_EXPORT: &str = "decide";
/// The memory a module exports so the host can read and write its buffers.
pub const MEMORY_EXPORT: &str = "memory";
/// Largest module accepted, in bytes.
pub const MAX_MODULE_BYTES: usize = 256 * 1024;
/// Fuel for one evaluation: instantiation and `decide` together. Roughly one unit per
/// instruction; a few thousand are plenty for counting rules.
pub const FUEL_PER_DECISION: u64 = 1_000_000;
/// Most linear memory a module may have, in bytes (16 pages of 64 KiB).
pub const MAX_MEMORY_BYTES: usize = 16 * 65_536;
/// Longest deny reason, in bytes.
pub const MAX_REASON_BYTES: usize = 256;

/// The integer inputs of one decision, read by the module with `keyfab.input(id)`; the
/// ids are the constants of [`input`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// Decision time, Unix seconds (the site's trusted time, not a clock the module reads).
    pub now: i64,
    /// Days since 1970-01-01 of the civil date of `now` in the policy's time zone.
    pub local_day: i64,
    /// Wall-clock seconds since local midnight in the policy's time zone (0..86_399).
    pub local_second: i64,
    /// Devices allowed under the entitlement so far.
    pub total: i64,
    /// Devices allowed on the local day of `now`.
    pub today: i64,
    /// Devices allowed through the requesting station so far (0 without a station).
    pub station_total: i64,
    /// Devices allowed through the requesting station today.
    pub station_today: i64,
    /// Devices reported `failed` by their station today.
    pub failed_today: i64,
    /// The key sources this device receives, as bits of [`source_bits`].
    pub key_sources: i64,
    /// The entitlement's total quota.
    pub quota: i64,
    /// The daily limit, 0 when the policy has none.
    pub daily_limit: i64,
}

/// Ids for `keyfab.input(id) -> i64`. An id not listed here traps.
pub mod input {
    /// The trusted time (Unix seconds).
    pub const NOW: i32 = 0;
    /// The local day number in the policy's time zone.
    pub const LOCAL_DAY: i32 = 1;
    /// Seconds since local midnight.
    pub const LOCAL_SECOND: i32 = 2;
    /// Devices released under the entitlement.
    pub const TOTAL: i32 = 3;
    /// Devices released today.
    pub const TODAY: i32 = 4;
    /// Devices released to this station.
    pub const STATION_TOTAL: i32 = 5;
    /// Devices released to this station today.
    pub const STATION_TODAY: i32 = 6;
    /// Devices reported failed today.
    pub const FAILED_TODAY: i32 = 7;
    /// The policy's key sources ([`crate::source_bits`]).
    pub const KEY_SOURCES: i32 = 8;
    /// The quota.
    pub const QUOTA: i32 = 9;
    /// The daily limit (0: none).
    pub const DAILY_LIMIT: i32 = 10;
}

/// Bits of [`Facts::key_sources`].
pub mod source_bits {
    /// `hq-pool` keys.
    pub const HQ_POOL: i64 = 1;
    /// `site` keys.
    pub const SITE: i64 = 2;
    /// `device` keys.
    pub const DEVICE: i64 = 4;
    /// `derived` keys.
    pub const DERIVED: i64 = 8;
}

impl Facts {
    fn get(&self, id: i32) -> Option<i64> {
        Some(match id {
            input::NOW => self.now,
            input::LOCAL_DAY => self.local_day,
            input::LOCAL_SECOND => self.local_second,
            input::TOTAL => self.total,
            input::TODAY => self.today,
            input::STATION_TOTAL => self.station_total,
            input::STATION_TODAY => self.station_today,
            input::FAILED_TODAY => self.failed_today,
            input::KEY_SOURCES => self.key_sources,
            input::QUOTA => self.quota,
            input::DAILY_LIMIT => self.daily_limit,
            _ => return None,
        })
    }
}

/// One request as the module sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The device id.
    pub device_id: &'a str,
    /// The station, when known.
    pub station: Option<&'a str>,
    /// The numbers `keyfab.input` gives.
    pub facts: Facts,
}

/// What the module decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The module allows the request.
    Allow,
    /// The module refused (code `policy_denied`), with the reason it gave.
    Deny {
        /// What the module said, or what made it fail.
        reason: String,
    },
    /// The module failed — trapped, ran out of fuel or memory, broke the host API —
    /// and the request is refused (code `policy_error`). Its state changes are dropped.
    Error {
        /// What the module said, or what made it fail.
        reason: String,
    },
}

/// A verdict and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The verdict.
    pub verdict: Verdict,
    /// Fuel the evaluation used.
    pub fuel_used: u64,
}

/// Why a module is refused before it is signed or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// Larger than the module size bound.
    #[error("the module is {0} bytes; at most {MAX_MODULE_BYTES} are accepted")]
    TooLarge(usize),
    /// Not valid WebAssembly, or using what keyfab does not allow (floats, …).
    #[error("not a valid WebAssembly module for keyfab: {0}")]
    Invalid(String),
    /// The module imports a function keyfab does not offer.
    #[error("imports `{module}.{name}`, which is not part of the keyfab host API ({list})", list = host::FUNCTIONS.join(", "))]
    Import {
        /// The import's module name.
        module: String,
        /// The function's name.
        name: String,
    },
    /// The module does not export what keyfab calls, as it must.
    #[error("{0}")]
    Export(String),
}

/// A validated, compiled policy module, ready for many evaluations.
pub struct PolicyModule {
    engine: Engine,
    module: Module,
    linker: Linker<Host>,
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyModule").finish_non_exhaustive()
    }
}

fn engine() -> Engine {
    let mut config = Config::default();
    config
        .consume_fuel(true)
        // Determinism: no floats at all (their NaN bits differ between machines).
        .floats(false)
        // Nothing runs at instantiation: all work happens in `decide`, under fuel.
        .allow_start_fn(false)
        // Every function is validated and compiled when the module is loaded, so HQ
        // refuses a bad module before signing it rather than the site at run time.
        .compilation_mode(CompilationMode::Eager)
        // Not `EnforcedLimits::strict()`: in wasmi 2.0 its bytes-per-function check
        // divides by the function count, and a code section that claims bytes but no
        // functions panicked it (found by the `policy_module` fuzz target; the input is
        // kept in fuzz/seeds). The module size bound above keeps eager compilation small.
        .wasm_multi_memory(false);
    Engine::new(&config)
}

impl PolicyModule {
    /// Validates and compiles `wasm`: core WebAssembly without floats, imports only from
    /// the host API, exports `decide: () -> i32` and `memory`.
    pub fn load(wasm: &[u8]) -> Result<Self, ModuleError> {
        if wasm.len() > MAX_MODULE_BYTES {
            return Err(ModuleError::TooLarge(wasm.len()));
        }
        validate(wasm)?;
        let engine = engine();
        let module = Module::new(&engine, wasm).map_err(|e| ModuleError::Invalid(e.to_string()))?;
        for import in module.imports() {
            let known = import.module() == HOST_MODULE && host::FUNCTIONS.contains(&import.name());
            if !known || import.ty().func().is_none() {
                return Err(ModuleError::Import {
                    module: import.module().to_owned(),
                    name: import.name().to_owned(),
                });
            }
        }
        check_exports(&module)?;
        let linker = host::linker(&engine);
        let loaded = Self {
            engine,
            module,
            linker,
        };
        // A trial instantiation checks the imports' signatures against the host API and
        // that the module's memory fits the bound.
        let mut store = loaded.store(Host::new(
            "",
            None,
            Facts::default(),
            ModuleState::default(),
        ));
        loaded
            .linker
            .instantiate_and_start(&mut store, &loaded.module)
            .map_err(|e| ModuleError::Invalid(e.to_string()))?;
        Ok(loaded)
    }

    fn store(&self, host: Host) -> Store<Host> {
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        // Fuel is enabled by `engine()`, so this cannot fail.
        let _ = store.set_fuel(FUEL_PER_DECISION);
        store
    }

    /// A fresh instance of the module, ready for one decision.
    fn instantiate(&self) -> ReadyInstance {
        let mut store = self.store(Host::new(
            "",
            None,
            Facts::default(),
            ModuleState::default(),
        ));
        let decide = self
            .linker
            .instantiate_and_start(&mut store, &self.module)
            .and_then(|instance| instance.get_typed_func::<(), i32>(&store, DECIDE_EXPORT))
            .map_err(|e| describe_failure(&e));
        ReadyInstance { store, decide }
    }

    /// Runs the module once for `request` on a fresh instance. On [`Verdict::Allow`] and
    /// [`Verdict::Deny`] the module's writes are in `state`; on [`Verdict::Error`] `state`
    /// is unchanged.
    pub fn evaluate(&self, request: &Request<'_>, state: &mut ModuleState) -> Evaluation {
        self.instantiate().run(request, state)
    }
}

/// A fresh instance of a policy module, for exactly one decision.
struct ReadyInstance {
    store: Store<Host>,
    decide: Result<wasmi::TypedFunc<(), i32>, String>,
}

impl std::fmt::Debug for ReadyInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyInstance").finish_non_exhaustive()
    }
}

impl ReadyInstance {
    /// Decides `request`; see [`PolicyModule::evaluate`].
    fn run(self, request: &Request<'_>, state: &mut ModuleState) -> Evaluation {
        let Self { mut store, decide } = self;
        {
            let host = store.data_mut();
            host.device_id = request.device_id.to_owned();
            host.station = request.station.map(str::to_owned);
            host.facts = request.facts;
            // Only this evaluation's writes may be undone.
            host.state = std::mem::take(state).into_committed();
        }
        // Fuel is enabled by `engine()`, so this cannot fail.
        let _ = store.set_fuel(FUEL_PER_DECISION);
        let result = match decide {
            Ok(decide) => decide
                .call(&mut store, ())
                .map_err(|e| describe_failure(&e)),
            Err(failed) => Err(failed),
        };
        let fuel_used = FUEL_PER_DECISION.saturating_sub(store.get_fuel().unwrap_or(0));
        let mut host = store.into_data();
        let verdict = match result {
            Ok(0) => Verdict::Allow,
            Ok(1) => Verdict::Deny {
                reason: host.reason.take().unwrap_or_default(),
            },
            Ok(other) => Verdict::Error {
                reason: format!("decide returned {other}; 0 allows, 1 denies"),
            },
            Err(reason) => Verdict::Error { reason },
        };
        if matches!(verdict, Verdict::Error { .. }) {
            host.state.roll_back();
        }
        *state = host.state.into_committed();
        Evaluation { verdict, fuel_used }
    }
}

/// Validates the whole module with the features `engine()` enables, before wasmi
/// translates it: wasmi's translator assumes valid input (fuzzing found debug assertions
/// it trips on invalid bodies), so only a module already known valid reaches it.
fn validate(wasm: &[u8]) -> Result<(), ModuleError> {
    use wasmparser::WasmFeatures as F;
    let features = F::MUTABLE_GLOBAL
        | F::MULTI_VALUE
        | F::SATURATING_FLOAT_TO_INT
        | F::SIGN_EXTENSION
        | F::BULK_MEMORY
        | F::REFERENCE_TYPES
        | F::GC_TYPES
        | F::TAIL_CALL
        | F::EXTENDED_CONST;
    wasmparser::Validator::new_with_features(features)
        .validate_all(wasm)
        .map(drop)
        .map_err(|e| ModuleError::Invalid(e.to_string()))
}

fn check_exports(module: &Module) -> Result<(), ModuleError> {
    let mut decide_ok = false;
    let mut memory_ok = false;
    for export in module.exports() {
        match (export.name(), export.ty()) {
            (DECIDE_EXPORT, ExternType::Func(f)) => {
                if !f.params().is_empty() || f.results() != [wasmi::ValType::I32] {
                    return Err(ModuleError::Export(format!(
                        "`{DECIDE_EXPORT}` must be `() -> i32`, not {:?} -> {:?}",
                        f.params(),
                        f.results()
                    )));
                }
                decide_ok = true;
            }
            (MEMORY_EXPORT, ExternType::Memory(_)) => memory_ok = true,
            (DECIDE_EXPORT | MEMORY_EXPORT, other) => {
                return Err(ModuleError::Export(format!(
                    "`{}` must be a {}, not {other:?}",
                    export.name(),
                    if export.name() == DECIDE_EXPORT {
                        "function"
                    } else {
                        "memory"
                    }
                )))
            }
            _ => {}
        }
    }
    match (decide_ok, memory_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(ModuleError::Export(format!(
            "the module does not export the function `{DECIDE_EXPORT}: () -> i32`"
        ))),
        (_, false) => Err(ModuleError::Export(format!(
            "the module does not export its memory as `{MEMORY_EXPORT}`"
        ))),
    }
}

/// A failure in words an author can act on. Deterministic: the same failure gives the
/// same text at the site and at HQ.
fn describe_failure(e: &wasmi::Error) -> String {
    match e.as_trap_code() {
        Some(wasmi::TrapCode::OutOfFuel) => {
            format!("ran out of fuel ({FUEL_PER_DECISION} units per decision)")
        }
        Some(wasmi::TrapCode::GrowthOperationLimited) => {
            format!("tried to grow memory beyond {MAX_MEMORY_BYTES} bytes")
        }
        Some(code) => format!("trapped: {code}"),
        None => {
            let text = e.to_string();
            let mut cut = text.len().min(MAX_REASON_BYTES);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text[..cut].to_owned()
        }
    }
}

/// Checks `wasm` and wraps it for the policy: what HQ signs into the entitlement.
pub fn embed(name: &str, wasm: Vec<u8>) -> Result<keyfab_policy::PolicyCode, ModuleError> {
    PolicyModule::load(&wasm)?;
    Ok(keyfab_policy::PolicyCode {
        name: name.to_owned(),
        sha256: sha256_hex(&wasm),
        module: wasm,
    })
}

/// Loads the module a policy carries, after checking it is the one its SHA-256 names.
pub fn load_embedded(code: &keyfab_policy::PolicyCode) -> Result<PolicyModule, ModuleError> {
    if sha256_hex(&code.module) != code.sha256 {
        return Err(ModuleError::Invalid(format!(
            "{}: the module does not match its SHA-256",
            code.name
        )));
    }
    PolicyModule::load(&code.module)
}

/// The module an author wrote: a `.wasm` file as it is, a `.wat` file (the WebAssembly
/// text format) assembled to binary.
pub fn module_bytes(path: &std::path::Path, bytes: Vec<u8>) -> Result<Vec<u8>, ModuleError> {
    if path.extension().is_some_and(|e| e == "wat") {
        wat::parse_bytes(&bytes)
            .map(|b| b.into_owned())
            .map_err(|e| ModuleError::Invalid(format!("WAT: {e}")))
    } else {
        Ok(bytes)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    keyfab_crypto::hash::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
