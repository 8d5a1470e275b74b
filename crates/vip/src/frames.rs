//! Ethernet frames that announce the VIP to its neighbours: gratuitous ARP
//! (IPv4) and unsolicited neighbour advertisements (IPv6). Pure functions;
//! sending is in `lib.rs`.

use std::net::{Ipv4Addr, Ipv6Addr};

pub(crate) type Mac = [u8; 6];

pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const ETHERTYPE_IPV6: u16 = 0x86dd;
pub(crate) const BROADCAST_MAC: Mac = [0xff; 6];
/// ff02::1 (all nodes) maps to this Ethernet multicast address (RFC 2464).
pub(crate) const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];
pub(crate) const ALL_NODES_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

pub(crate) const ARP_REQUEST: u16 = 1;
pub(crate) const ARP_REPLY: u16 = 2;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
const IPPROTO_ICMPV6: u8 = 58;
/// Override flag of a neighbour advertisement (RFC 4861 4.4): receivers
/// replace the link-layer address they have cached for the target.
const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
const ND_OPT_TARGET_LINKADDR: u8 = 2;

fn ethernet_header(out: &mut Vec<u8>, dst: &Mac, src: &Mac, ethertype: u16) {
    out.extend_from_slice(dst);
    out.extend_from_slice(src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// A gratuitous ARP frame (RFC 5227 announcement style): sender and target
/// protocol address are both the VIP, broadcast at the Ethernet level. Linux
/// neighbours update an existing cache entry from either opcode; some other
/// stacks only listen to one of them, hence both are sent.
pub(crate) fn gratuitous_arp(mac: &Mac, ip: Ipv4Addr, op: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    ethernet_header(&mut f, &BROADCAST_MAC, mac, ETHERTYPE_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(mac); // sender hardware address
    f.extend_from_slice(&ip.octets()); // sender protocol address
                                       // Target hardware address: unknown (zero) in a request; in a reply the
                                       // broadcast address, as arping -A does.
    if op == ARP_REPLY {
        f.extend_from_slice(&BROADCAST_MAC);
    } else {
        f.extend_from_slice(&[0; 6]);
    }
    f.extend_from_slice(&ip.octets()); // target protocol address
    f
}

/// The Internet checksum (RFC 1071) of `data`, folded but not complemented.
fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// ICMPv6 checksum over the IPv6 pseudo-header and `icmp` (whose checksum
/// field must be zero).
pub(crate) fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    let sum = ones_complement_sum(icmp, ones_complement_sum(&pseudo, 0));
    !(sum as u16)
}

/// An unsolicited neighbour advertisement for `ip` (RFC 4861 7.2.6): sent
/// from the VIP to all nodes, hop limit 255 (receivers drop anything else),
/// override set and solicited clear, with the target link-layer address.
pub(crate) fn unsolicited_na(mac: &Mac, ip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.push(ICMPV6_NEIGHBOR_ADVERT);
    icmp.push(0); // code
    icmp.extend_from_slice(&[0, 0]); // checksum, filled below
    icmp.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&ip.octets());
    icmp.push(ND_OPT_TARGET_LINKADDR);
    icmp.push(1); // option length in units of 8 bytes
    icmp.extend_from_slice(mac);
    let sum = icmpv6_checksum(&ip, &ALL_NODES_V6, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    ethernet_header(&mut f, &ALL_NODES_MAC, mac, ETHERTYPE_IPV6);
    f.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // version 6, no class/flow
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(IPPROTO_ICMPV6);
    f.push(255); // hop limit
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&ALL_NODES_V6.octets());
    f.extend_from_slice(&icmp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn arp_request_layout() {
        let ip = Ipv4Addr::new(10, 77, 0, 100);
        let f = gratuitous_arp(&MAC, ip, ARP_REQUEST);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST_MAC);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[10, 77, 0, 100]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 77, 0, 100]);
        let r = gratuitous_arp(&MAC, ip, ARP_REPLY);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[32..38], &BROADCAST_MAC);
    }

    #[test]
    fn na_layout_and_checksum_verifies() {
        let ip: Ipv6Addr = "fd77::100".parse().unwrap();
        let f = unsolicited_na(&MAC, ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[0..6], &ALL_NODES_MAC);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip6 = &f[14..54];
        assert_eq!(ip6[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip6[4], ip6[5]]), 32);
        assert_eq!(ip6[6], 58);
        assert_eq!(ip6[7], 255);
        assert_eq!(&ip6[8..24], &ip.octets());
        assert_eq!(&ip6[24..40], &ALL_NODES_V6.octets());
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "override only: not router, not solicited");
        assert_eq!(&icmp[8..24], &ip.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC);
        // A receiver's check: the sum over pseudo-header and message
        // including the checksum is all ones.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip.octets());
        pseudo.extend_from_slice(&ALL_NODES_V6.octets());
        pseudo.extend_from_slice(&32u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        let sum = ones_complement_sum(icmp, ones_complement_sum(&pseudo, 0));
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn checksum_rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ones_complement_sum(&data, 0), 0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(ones_complement_sum(&[0x12], 0), 0x1200);
    }
}
