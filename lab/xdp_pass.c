// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The lab's switch ports: a veth delivers frames that its peer sends with XDP_TX
 * or XDP_REDIRECT only while it runs an XDP program itself, so every underlay-side
 * port runs this one, as a physical switch port takes any frame from the wire.
 * No headers: it needs nothing but the XDP_PASS verdict (2). */
__attribute__((section("xdp"), used)) int xdp_pass(void *ctx)
{
	return 2;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
