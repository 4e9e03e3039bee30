//! The agent's hub, kernel side (see `tracer_common::hub`): route programs
//! attached once to each tracepoint any target uses, tail-calling the
//! target's own program for that route. Loaded only by the agent (its exec
//! watcher's load); in every other load the two maps stay minimal and no
//! route program is loaded.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{HashMap, ProgramArray},
    programs::TracePointContext,
};
use tracer_common::hub::ROUTES;

/// The agent's targets: tgid → slot (sized by user space: its target bound).
#[map]
static HUB_TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(1, 0);

/// Every target's programs, at `slot * ROUTES + route`.
#[map]
static HUB_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Hands the event to the caller's target program for `route`, if the
/// caller is a target and has one there; else nothing happens.
#[inline(always)]
fn route(ctx: &TracePointContext, route: u32) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a value copied out of the map at once.
    if let Some(&slot) = unsafe { HUB_TARGETS.get(&tgid) } {
        // SAFETY: a tail call with this program's own context; an empty or
        // out-of-range index falls through.
        unsafe { HUB_PROGRAMS.tail_call(ctx, slot.wrapping_mul(ROUTES).wrapping_add(route)) };
    }
    0
}

/// One route program per route index, `hub_route_N`.
macro_rules! routes {
    ($($name:ident = $index:literal),* $(,)?) => {$(
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            route(&ctx, $index)
        }
    )*};
}

routes!(
    hub_route_0 = 0, hub_route_1 = 1, hub_route_2 = 2, hub_route_3 = 3, hub_route_4 = 4, hub_route_5 = 5, hub_route_6 = 6, hub_route_7 = 7,
    hub_route_8 = 8, hub_route_9 = 9, hub_route_10 = 10, hub_route_11 = 11, hub_route_12 = 12, hub_route_13 = 13, hub_route_14 = 14, hub_route_15 = 15,
    hub_route_16 = 16, hub_route_17 = 17, hub_route_18 = 18, hub_route_19 = 19, hub_route_20 = 20, hub_route_21 = 21, hub_route_22 = 22, hub_route_23 = 23,
    hub_route_24 = 24, hub_route_25 = 25, hub_route_26 = 26, hub_route_27 = 27, hub_route_28 = 28, hub_route_29 = 29, hub_route_30 = 30, hub_route_31 = 31,
    hub_route_32 = 32, hub_route_33 = 33, hub_route_34 = 34, hub_route_35 = 35, hub_route_36 = 36, hub_route_37 = 37, hub_route_38 = 38, hub_route_39 = 39,
    hub_route_40 = 40, hub_route_41 = 41, hub_route_42 = 42, hub_route_43 = 43, hub_route_44 = 44, hub_route_45 = 45, hub_route_46 = 46, hub_route_47 = 47,
    hub_route_48 = 48, hub_route_49 = 49, hub_route_50 = 50, hub_route_51 = 51, hub_route_52 = 52, hub_route_53 = 53, hub_route_54 = 54, hub_route_55 = 55,
    hub_route_56 = 56, hub_route_57 = 57, hub_route_58 = 58, hub_route_59 = 59, hub_route_60 = 60, hub_route_61 = 61, hub_route_62 = 62, hub_route_63 = 63,
);
