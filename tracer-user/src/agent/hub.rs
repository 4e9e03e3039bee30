//! The agent's hub, user side (see `tracer_common::hub`): the agent's one
//! set of tracepoint programs, and a [`Seat`] per target through which the
//! target's load puts its tracepoint programs behind them instead of on
//! the tracepoints.
//!
//! A route is one (tracepoint, program) pair: the first target that puts a
//! program on `syscalls:sys_exit_socket` makes route N and attaches
//! `hub_route_N` there; later targets put theirs at the same N in their own
//! slot. A target with two programs on one tracepoint (`close` for the
//! connection and fd trackers) takes two routes of it.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, ProgramArray},
    programs::ProgramFd,
};
use tracer_common::hub::ROUTES;

use crate::probes::{LoadSettings, Probes};

/// The hub: shared by the agent's sessions (each holds a [`Seat`]).
#[derive(Clone)]
pub struct Hub(Arc<Mutex<Tables>>);

struct Tables {
    /// The load the route programs belong to (the agent's exec watcher's).
    probes: Probes,
    /// tgid → slot.
    targets: BpfHashMap<MapData, u32, u32>,
    /// Every target's programs, at `slot * ROUTES + route`.
    programs: ProgramArray<MapData>,
    /// Route index → its tracepoint (category, event).
    routes: Vec<(String, String)>,
    /// Slot → the tgid seated there.
    slots: Vec<Option<u32>>,
}

/// A target's place in the hub; dropping it takes the target's programs out.
pub struct Seat {
    hub: Hub,
    tgid: u32,
    slot: u32,
    /// Routes this target has a program on.
    routes: Vec<u32>,
}

/// Sizes the hub's maps in the load that carries it: `max_targets` slots.
pub fn configure(settings: &mut LoadSettings, max_targets: u32) {
    settings.max_entries.push(("HUB_TARGETS", max_targets));
    settings.max_entries.push(("HUB_PROGRAMS", max_targets * ROUTES));
}

impl Hub {
    /// The hub of `probes`, loaded with its maps [`configure`]d for
    /// `max_targets`; no route program is attached until a target needs it.
    pub fn new(mut probes: Probes, max_targets: u32) -> Result<Self> {
        let targets = probes.take_map("HUB_TARGETS")?;
        let programs = probes.take_map("HUB_PROGRAMS")?;
        let slots = vec![None; max_targets as usize];
        Ok(Self(Arc::new(Mutex::new(Tables { probes, targets, programs, routes: Vec::new(), slots }))))
    }

    /// A seat for `tgid`: its programs are routed once it puts them in
    /// ([`Seat::route`]).
    pub fn seat(&self, tgid: u32) -> Result<Seat> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = t.slots.iter().position(Option::is_none) else {
            bail!("the agent's hub is full ({} targets)", t.slots.len());
        };
        t.slots[slot] = Some(tgid);
        Ok(Seat { hub: self.clone(), tgid, slot: slot as u32, routes: Vec::new() })
    }
}

impl Seat {
    /// Puts `program` (of the target's own load) behind the hub's route
    /// program on `category:event`, attaching a new route there if every
    /// route of that tracepoint already holds one of this target's.
    pub fn route(&mut self, program: &ProgramFd, category: &str, event: &str) -> Result<()> {
        let mut t = self.hub.0.lock().unwrap_or_else(|e| e.into_inner());
        let free = t.routes.iter().enumerate().position(|(r, (c, e))| c == category && e == event && !self.routes.contains(&(r as u32)));
        let route = match free {
            Some(r) => r as u32,
            None => {
                let r = t.routes.len() as u32;
                if r >= ROUTES {
                    bail!("the agent's hub has no route left for {category}:{event} (all {ROUTES} in use)");
                }
                t.probes.attach_tracepoint(&format!("hub_route_{r}"), category, event)?;
                t.routes.push((category.to_string(), event.to_string()));
                r
            }
        };
        t.programs
            .set(self.slot * ROUTES + route, program, 0)
            .with_context(|| format!("cannot route {category}:{event} to pid {}", self.tgid))?;
        self.routes.push(route);
        if self.routes.len() == 1 {
            t.targets.insert(self.tgid, self.slot, 0).map_err(|e| anyhow!("cannot seat pid {} in the agent's hub: {e}", self.tgid))?;
        }
        Ok(())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut t = self.hub.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = t.targets.remove(&self.tgid);
        for r in &self.routes {
            let _ = t.programs.clear_index(&(self.slot * ROUTES + r));
        }
        t.slots[self.slot as usize] = None;
    }
}
