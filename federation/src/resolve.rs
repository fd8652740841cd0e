//! State resolution: the state of a room where its history forked, from the states at the tips
//! of the fork. The algorithm is ruma's (`state_res::resolve`, the spec's version 2 and, from
//! room version 12, 2.1); this module gives it what it reads: each state's auth chain and, for
//! 2.1, the conflicted state subgraph.

use std::collections::{HashMap, HashSet};

use ruma::{
    OwnedEventId, RoomVersionId,
    events::StateEventType,
    room_version_rules::StateResolutionVersion,
    state_res::{self, StateMap, utils::event_id_set::EventIdSet},
};

use crate::{auth::Pdu, pdu::rules};

/// Resolves `states` (type and state key → event id), given every event they name and every
/// event in those events' auth chains (`events`). Room version 1's algorithm is not supported.
pub fn resolve(
    version: &RoomVersionId,
    states: &[StateMap<OwnedEventId>],
    events: &HashMap<OwnedEventId, Pdu>,
) -> Result<StateMap<OwnedEventId>, String> {
    let rules = rules(version).map_err(|e| e.to_string())?;
    let StateResolutionVersion::V2(state_res_rules) = rules.state_res else {
        return Err(format!("state resolution of room version {version} is not supported"));
    };
    let mut chains = Chains { events, memo: HashMap::new() };
    let auth_chains: Vec<EventIdSet<OwnedEventId>> = states
        .iter()
        .map(|state| {
            let mut union = HashSet::new();
            for id in state.values() {
                union.extend(chains.of(id).iter().cloned());
            }
            union.into_iter().collect()
        })
        .collect();
    let fetch = |id: &ruma::EventId| events.get(id).cloned();
    let subgraph = |conflicted: &StateMap<Vec<OwnedEventId>>| {
        Some(conflicted_subgraph(&mut Chains { events, memo: HashMap::new() }, conflicted))
    };
    state_res::resolve(&rules.authorization, &state_res_rules, states.iter(), auth_chains, fetch, subgraph)
        .map_err(|e| e.to_string())
}

/// The auth chains of events, worked out once each.
struct Chains<'a> {
    events: &'a HashMap<OwnedEventId, Pdu>,
    memo: HashMap<OwnedEventId, HashSet<OwnedEventId>>,
}

impl Chains<'_> {
    /// Every event `id` names as an auth event, theirs, and so on (without `id`).
    fn of(&mut self, id: &OwnedEventId) -> HashSet<OwnedEventId> {
        if let Some(chain) = self.memo.get(id) {
            return chain.clone();
        }
        // Iteratively, deepest first: a long chain must not overflow the stack.
        let mut order = Vec::new();
        let mut stack = vec![(id.clone(), false)];
        let mut seen = HashSet::new();
        while let Some((next, expanded)) = stack.pop() {
            if expanded {
                order.push(next);
                continue;
            }
            if self.memo.contains_key(&next) || !seen.insert(next.clone()) {
                continue;
            }
            stack.push((next.clone(), true));
            if let Some(pdu) = self.events.get(&next) {
                for auth in &pdu.auth_events {
                    stack.push((auth.clone(), false));
                }
            }
        }
        for next in order {
            let mut chain = HashSet::new();
            if let Some(pdu) = self.events.get(&next) {
                for auth in &pdu.auth_events {
                    chain.insert(auth.clone());
                    if let Some(theirs) = self.memo.get(auth) {
                        chain.extend(theirs.iter().cloned());
                    }
                }
            }
            self.memo.insert(next, chain);
        }
        self.memo.get(id).cloned().unwrap_or_default()
    }
}

/// The events on auth paths between conflicted events (state resolution 2.1): each conflicted
/// event, and each event in a conflicted event's auth chain whose own auth chain holds a
/// conflicted event.
fn conflicted_subgraph(
    chains: &mut Chains<'_>,
    conflicted: &StateMap<Vec<OwnedEventId>>,
) -> EventIdSet<OwnedEventId> {
    let conflicted: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
    let mut subgraph: HashSet<OwnedEventId> = conflicted.clone();
    for id in &conflicted {
        for ancestor in chains.of(id) {
            if chains.of(&ancestor).iter().any(|below| conflicted.contains(below)) {
                subgraph.insert(ancestor);
            }
        }
    }
    subgraph.into_iter().collect()
}

/// A state map as ruma reads it, from stored `(type, state key) → event id` pairs.
pub fn state_map<'a>(
    pairs: impl IntoIterator<Item = (&'a (String, String), &'a String)>,
) -> Result<StateMap<OwnedEventId>, String> {
    pairs
        .into_iter()
        .map(|((kind, key), id)| {
            let id = OwnedEventId::try_from(id.as_str()).map_err(|e| e.to_string())?;
            Ok(((StateEventType::from(kind.as_str()), key.clone()), id))
        })
        .collect()
}
