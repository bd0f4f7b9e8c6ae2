//! One telemetry sample as the agent measures it and the hub stores it.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// A snapshot of a device's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When the sample was taken (device clock).
    pub at: Timestamp,
    /// CPU busy share over the last interval, 0–100, averaged over cores.
    pub cpu_percent: f32,
    /// Memory in use (total minus available), bytes.
    pub mem_used_bytes: u64,
    /// Installed memory, bytes.
    pub mem_total_bytes: u64,
    /// Swap in use, bytes.
    pub swap_used_bytes: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f32; 3],
    /// Seconds since the device booted.
    pub uptime_secs: u64,
    /// Mounted file systems.
    pub disks: Vec<DiskSample>,
    /// Network interfaces, counters since boot.
    pub net: Vec<NetSample>,
    /// Temperature sensors, where the hardware has any.
    pub temperatures: Vec<TempSample>,
}

/// One mounted file system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskSample {
    /// Mount point.
    pub mount: String,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Size in bytes.
    pub total_bytes: u64,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetSample {
    /// Interface name.
    pub iface: String,
    /// Bytes received since boot.
    pub rx_bytes: u64,
    /// Bytes sent since boot.
    pub tx_bytes: u64,
}

/// One temperature sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TempSample {
    /// Sensor label.
    pub label: String,
    /// Degrees Celsius.
    pub celsius: f32,
}

impl Sample {
    /// Memory in use as a share of installed memory, 0–100.
    pub fn mem_percent(&self) -> f32 {
        if self.mem_total_bytes == 0 {
            0.0
        } else {
            (self.mem_used_bytes as f64 * 100.0 / self.mem_total_bytes as f64) as f32
        }
    }
}
