//! The VIP while this node serves: added through netlink as an address
//! lease (it lapses by itself unless renewed), announced, renewed, and
//! registered with the fencing guard so that it disappears at once if the
//! daemon dies.

use super::guard_client::Guard;
use hapair_vip::Vip;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

pub struct VipCtl {
    vip: Vip,
    cidr: String,
    lease_secs: u32,
    guard: Arc<Guard>,
    renew: Option<tokio::task::JoinHandle<()>>,
    /// True while the VIP is held. A renewal runs with this lock held and
    /// only if it is true, and `release` clears it under the lock before
    /// removing the address: a renewal never re-adds a released VIP.
    holding: Arc<std::sync::Mutex<bool>>,
}

impl VipCtl {
    pub fn new(vip: Vip, cidr: String, lease_secs: u32, guard: Arc<Guard>) -> VipCtl {
        VipCtl {
            vip,
            cidr,
            lease_secs,
            guard,
            renew: None,
            holding: Arc::new(std::sync::Mutex::new(false)),
        }
    }

    /// Whether the kernel has the address on the interface right now.
    pub fn present(&self) -> Option<bool> {
        hapair_vip::is_present(&self.vip).ok()
    }

    pub fn describe(&self) -> String {
        format!("{} on {}", self.cidr, self.vip.ifname)
    }

    /// Adds, announces and keeps renewing the VIP.
    pub fn take(&mut self) {
        if self.renew.is_some() {
            return;
        }
        self.guard.set_vip(&self.cidr, &self.vip.ifname);
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = true;
        match hapair_vip::acquire(&self.vip, self.lease_secs) {
            Ok(()) => info!(vip = %self.describe(), lease_secs = self.lease_secs, "VIP taken"),
            Err(e) => error!(vip = %self.describe(), "cannot add the VIP: {e} (retrying)"),
        }
        let (vip, lease, holding) = (self.vip.clone(), self.lease_secs, self.holding.clone());
        self.renew = Some(tokio::spawn(async move {
            let (v, h) = (vip.clone(), holding.clone());
            let _ = tokio::task::spawn_blocking(move || {
                // Announce only while held, never for a released VIP.
                let held = h.lock().unwrap_or_else(|p| p.into_inner());
                if *held {
                    if let Err(e) =
                        hapair_vip::announce_with_interval(&v, 3, Duration::from_millis(100))
                    {
                        warn!("VIP announcement failed: {e}");
                    }
                }
            })
            .await;
            let every = Duration::from_millis((lease as u64 * 1000 / 3).max(300));
            loop {
                tokio::time::sleep(every).await;
                let (v, h) = (vip.clone(), holding.clone());
                let r = tokio::task::spawn_blocking(move || {
                    let held = h.lock().unwrap_or_else(|p| p.into_inner());
                    if *held {
                        hapair_vip::renew(&v, lease)
                    } else {
                        Ok(())
                    }
                })
                .await;
                if let Ok(Err(e)) = r {
                    error!("cannot renew the VIP lease: {e}");
                }
            }
        }));
    }

    pub fn release(&mut self) {
        if let Some(t) = self.renew.take() {
            t.abort();
        }
        let mut held = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        *held = false;
        match hapair_vip::release(&self.vip) {
            Ok(()) => info!(vip = %self.describe(), "VIP released"),
            Err(e) => {
                error!(vip = %self.describe(), "cannot remove the VIP: {e} (its lease lapses within {} s)", self.lease_secs)
            }
        }
        drop(held);
        self.guard.clear_vip();
    }
}
