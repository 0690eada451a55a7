//! `keyfab site provision`: one device, or a lot from a list of device ids.

use crate::cli::*;
use crate::context::Context;
use crate::output::{
    after_release, io_fail, read_input, read_input_text, Failure, Outcome, Report,
};
use keyfab_crypto::x509::{self};
use keyfab_node::Code;
use keyfab_node::NodeKind;
use keyfab_site::provision::checked;
use std::path::Path;

/// The size cap of a device list or a policy module's cases: a million ids of the
/// longest kind, with their line ends.
pub(crate) const MAX_LIST_BYTES: usize = 1_000_000 * (keyfab_policy::MAX_ID_BYTES + 1);

pub(crate) fn provision(ctx: &Context, a: &ProvisionArgs) -> Result<Report, Failure> {
    // An output that cannot be written is refused before any key is released.
    if let (Some(out), None) = (&a.out, &a.device_ids) {
        keyfab_node::out_file::check_new(out, "nothing was asked of the site")?;
    }
    let node = std::sync::Arc::new(ctx.open(&a.home.home, NodeKind::Site)?);
    let csr = match &a.csr {
        Some(path) => {
            let bytes = read_input(path, keyfab_formats::MAX_SMALL_INPUT)?;
            Some(match std::str::from_utf8(&bytes) {
                Ok(text) if text.contains("-----BEGIN") => {
                    x509::from_pem(text, "CERTIFICATE REQUEST")
                        .map_err(|e| Failure::new(Code::InvalidInput, format!("--csr: {e}")))?
                }
                _ => bytes,
            })
        }
        None => None,
    };
    let lot = a.device_ids.is_some();
    if lot && (a.chip.transport_key.is_some() || a.chip.chip_chain.is_some()) {
        return Err(Failure::new(
            Code::InvalidInput,
            "--transport-key and --chip-chain belong to one chip: give them with --device-id, not --device-ids",
        ));
    }
    let transport_key = a
        .chip
        .transport_key
        .as_deref()
        .map(crate::output::read_transport_key)
        .transpose()?;
    let chip_chain = a
        .chip
        .chip_chain
        .as_deref()
        .map(crate::output::read_chip_chain)
        .transpose()?;
    // A site that stopped itself, or whose log's end or size no longer fits, decides
    // nothing (the latter latches it).
    keyfab_site::latch::check_cheaply(&node)?;
    if lot {
        // A lot is a run of the line: a copy of the home taken before it is behind the
        // TPM from now on (one step per lot, not per device).
        keyfab_site::rollback_counter::advance(&node)?;
    }
    let provisioner = keyfab_site::provision::Provisioner::start(node);
    let entitlement: keyfab_policy::EntitlementId = checked(&a.entitlement)?;
    let station: Option<keyfab_policy::StationName> =
        a.station.as_deref().map(checked).transpose()?;
    let request = |device_id: String,
                   request_id: String|
     -> Result<keyfab_site::provision::ProvisionRequest, keyfab_node::Error> {
        Ok(keyfab_site::provision::ProvisionRequest {
            entitlement: entitlement.clone(),
            device_id: checked(&device_id)?,
            station: station.clone(),
            request_id: checked(&request_id)?,
            csr: csr.clone(),
            transport_key: transport_key.clone(),
            chip_chain: chip_chain.clone(),
        })
    };
    if let (Some(list), Some(out)) = (&a.device_ids, &a.out) {
        return provision_many(&provisioner, list, out, request);
    }
    let device_id = a
        .device_id
        .clone()
        .ok_or_else(|| Failure::new(Code::InvalidInput, "--device-id or --device-ids is needed"))?;
    let request_id = match &a.request_id {
        Some(r) => r.clone(),
        None => {
            let mut b = [0u8; 16];
            ctx.rng().fill(&mut b);
            hex::encode(b)
        }
    };
    let p = provisioner.provision(request(device_id.clone(), request_id.clone())?)?;
    let bundle = keyfab_site::bundle::device_bundle(&p);
    if let Some(out) = &a.out {
        keyfab_node::out_file::write_new(out, format!("{bundle:#}\n").as_bytes()).map_err(|e| {
            let file = |flag: &str, p: &Option<std::path::PathBuf>| {
                p.as_ref()
                    .map_or_else(String::new, |p| format!(" {flag} {}", p.display()))
            };
            let again = format!(
                "keyfab site provision --home {} --entitlement {} --device-id {device_id} --request-id {request_id}{}{}{}{} --out OTHER-FILE",
                a.home.home.display(),
                a.entitlement,
                a.station.as_ref().map(|s| format!(" --station {s}")).unwrap_or_default(),
                file("--csr", &a.csr),
                file("--transport-key", &a.chip.transport_key),
                file("--chip-chain", &a.chip.chip_chain),
            );
            after_release(io_fail(out, e), &request_id, &again)
        })?;
    }
    let mut text = format!(
        "device {} provisioned under {} (audit record {}{})\n",
        p.device_id,
        p.entitlement,
        p.audit_sequence,
        if p.replayed {
            ", a retry of an earlier request"
        } else {
            ""
        }
    );
    for k in &p.keys {
        text.push_str(&format!(
            "  {:<12} {:<8} {:<8} {}\n",
            k.name,
            k.key_type.as_str(),
            k.source.as_str(),
            k.key_id
        ));
    }
    text.push_str(&match &a.out {
        Some(out) => format!("key material written to {} (mode 0600)\n", out.display()),
        None => "key material not shown: use --out FILE or --json\n".into(),
    });
    Ok(Report::new(text, bundle))
}

/// Batch mode: every id of `list`, in order; one JSON line per device appended to `out`
/// (mode 0600) and flushed as soon as its keys are released.
pub(super) fn provision_many(
    provisioner: &keyfab_site::provision::Provisioner,
    list: &Path,
    out: &Path,
    request: impl Fn(
        String,
        String,
    ) -> Result<keyfab_site::provision::ProvisionRequest, keyfab_node::Error>,
) -> Result<Report, Failure> {
    use std::io::Write;
    let text = read_input_text(list, MAX_LIST_BYTES)?;
    // Every line is checked before the first device is asked for: a list with a line
    // that is no device id is refused whole, nothing provisioned.
    let mut requests = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        let req =
            request(id.to_owned(), keyfab_site::provision::lot_request_id(id)).map_err(|e| {
                Failure::new(
                    e.code(),
                    format!(
                        "{} line {}: {e}; nothing was provisioned",
                        list.display(),
                        number + 1
                    ),
                )
            })?;
        requests.push(req);
    }
    let (mut file, mut written) = open_lot_output(out)?;
    let (mut released, mut resumed) = (0u64, 0u64);
    let mut refused: std::collections::BTreeMap<String, u64> = Default::default();
    let mut refused_devices = Vec::new();
    for req in requests {
        let id = req.device_id.to_string();
        match provisioner.provision(req) {
            Ok(p) => {
                // A rerun replays the devices done before; the file has them already.
                if written.insert(p.device_id.clone()) {
                    let line = format!("{}\n", keyfab_site::bundle::device_bundle(&p));
                    file.write_all(line.as_bytes())
                        .map_err(|e| io_fail(out, e))?;
                    file.flush().map_err(|e| io_fail(out, e))?;
                }
                if p.replayed {
                    resumed += 1;
                } else {
                    released += 1;
                }
            }
            Err(e) if e.exit_code() == 3 => {
                *refused.entry(e.code().as_str().to_owned()).or_insert(0) += 1;
                refused_devices.push(RefusedDevice {
                    device_id: id,
                    code: e.code().as_str(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    file.sync_all().map_err(|e| io_fail(out, e))?;
    let devices = released + resumed + refused_devices.len() as u64;
    let done = LotDone {
        provisioned: released,
        resumed,
        refused: refused.clone(),
        refused_devices,
        out: out.to_owned(),
    };
    crate::line::partial_result(&done, devices, &refused)
}

/// A device of a lot the site refused, and why.
#[derive(serde::Serialize)]
struct RefusedDevice {
    device_id: String,
    code: &'static str,
}

/// `site provision --device-ids`: what a lot's run did.
#[derive(serde::Serialize)]
struct LotDone {
    provisioned: u64,
    resumed: u64,
    refused: std::collections::BTreeMap<String, u64>,
    refused_devices: Vec<RefusedDevice>,
    out: std::path::PathBuf,
}

/// How many refused devices the text lists by id (JSON lists them all).
const LISTED_REFUSALS: usize = 20;

impl Outcome for LotDone {
    fn text(&self) -> String {
        let mut text = format!(
            "{} devices provisioned, {} already done in an earlier run -> {}\n",
            self.provisioned,
            self.resumed,
            self.out.display()
        );
        for (code, n) in &self.refused {
            text.push_str(&format!("  refused {code}: {n}\n"));
        }
        for d in self.refused_devices.iter().take(LISTED_REFUSALS) {
            text.push_str(&format!("    {} {}\n", d.device_id, d.code));
        }
        if self.refused_devices.len() > LISTED_REFUSALS {
            text.push_str(&format!(
                "    … {} more (--json lists every one)\n",
                self.refused_devices.len() - LISTED_REFUSALS
            ));
        }
        text
    }
}

/// The output of a lot, opened to append: a new file (mode 0600), or the file of an
/// earlier run of the lot, with the devices it holds already. A last line cut short (the
/// run was killed while writing it) is cut off; its device is written again whole when
/// the rerun replays it. A whole line that is not a device's keys is refused.
fn open_lot_output(
    out: &Path,
) -> Result<(std::fs::File, std::collections::HashSet<String>), Failure> {
    use std::io::{BufRead, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    #[derive(serde::Deserialize)]
    struct Line {
        device_id: String,
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(out)
        .map_err(|e| io_fail(out, e))?;
    let mut written = std::collections::HashSet::new();
    let mut whole = 0u64;
    let mut reader = std::io::BufReader::new(&file);
    let mut line = String::new();
    for number in 1.. {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| io_fail(out, e))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let device: Line = serde_json::from_str(&line).map_err(|_| {
            Failure::new(
                Code::InvalidInput,
                format!(
                    "--out {}: line {number} is not a device's keys; name a new file, or the file of an earlier run of this lot; nothing was provisioned",
                    out.display()
                ),
            )
        })?;
        written.insert(device.device_id);
        whole += n as u64;
    }
    drop(reader);
    file.set_len(whole).map_err(|e| io_fail(out, e))?;
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|e| io_fail(out, e))?;
    Ok((file, written))
}
