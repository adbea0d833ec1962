package netcell

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// ErrNoNft reports that the nft binary (Debian package nftables) is not installed.
var ErrNoNft = errors.New("the nft binary is not installed (apt-get install nftables)")

// NftPath finds the nft binary: on $PATH, else where Debian puts it (a supervisor's $PATH may
// lack the sbin directories).
func NftPath() (string, error) {
	if p, err := exec.LookPath("nft"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/nft", "/sbin/nft"} {
		if p, err := exec.LookPath(p); err == nil {
			return p, nil
		}
	}
	return "", ErrNoNft
}

// nftTimeout bounds one nft invocation.
const nftTimeout = 15 * time.Second

// runNft applies a batch atomically: all of it or none.
func runNft(nft, batch string) error {
	ctx, cancel := context.WithTimeout(context.Background(), nftTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, nft, "-f", "-")
	cmd.Stdin = strings.NewReader(batch)
	cmd.WaitDelay = time.Second
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = msg[:2000] + "..."
		}
		return fmt.Errorf("nft -f -: %w: %s", err, msg)
	}
	return nil
}

// baseBatch (re)declares the shared table: adding what exists is a no-op, and the base chains
// are flushed and filled again in the same transaction, so the table is always exactly this,
// whichever cell came first.
//
//	forward:  established/related accept; nothing new INTO a cell; the cell's own chain by its
//	          interface; a cell interface without a chain is rejected.
//	input:    the same for traffic from a cell to the host itself: a cell reaches the host's
//	          services only when a rule of its own allows them.
//	output:   nothing new from the host into a cell.
//	postrouting (nat, only once a cell asked for it): the cell's masquerade chain.
func baseBatch(b *strings.Builder, nat bool) {
	const reject = "reject with icmpx type admin-prohibited"
	cells := IfPrefix + "*"
	fmt.Fprintf(b, "add table inet %s\n", Table)
	fmt.Fprintf(b, "add map inet %s egress { type ifname : verdict ; }\n", Table)
	fmt.Fprintf(b, "add map inet %s egress_nat { type ifname : verdict ; }\n", Table)
	chain := func(name, hook string, rules ...string) {
		typ, prio := "filter", "filter"
		if hook == "postrouting" {
			typ, prio = "nat", "srcnat"
		}
		fmt.Fprintf(b, "add chain inet %s %s { type %s hook %s priority %s ; policy accept ; }\n", Table, name, typ, hook, prio)
		fmt.Fprintf(b, "flush chain inet %s %s\n", Table, name)
		for _, r := range rules {
			fmt.Fprintf(b, "add rule inet %s %s %s\n", Table, name, r)
		}
	}
	chain("forward", "forward",
		"ct state established,related accept",
		fmt.Sprintf("oifname %q %s", cells, reject),
		"iifname vmap @egress",
		fmt.Sprintf("iifname %q %s", cells, reject))
	chain("input", "input",
		"ct state established,related accept",
		"iifname vmap @egress",
		fmt.Sprintf("iifname %q %s", cells, reject))
	chain("output", "output",
		"ct state established,related accept",
		fmt.Sprintf("oifname %q %s", cells, reject))
	if nat {
		chain("postrouting", "postrouting", "iifname vmap @egress_nat")
	}
}

// setupBatch is the one nft transaction that sets up a cell's rules: the shared table, the
// cell's chain, its entry in @egress and, with an uplink, its masquerade chain.
func setupBatch(c *Cell) string {
	const reject = "reject with icmpx type admin-prohibited"
	var b strings.Builder
	baseBatch(&b, c.Uplink != "")
	chain := c.HostIf
	fmt.Fprintf(&b, "add chain inet %s %s\n", Table, chain)
	fmt.Fprintf(&b, "flush chain inet %s %s\n", Table, chain)
	// Other cells and the host behind any cell's link are never destinations, whatever the rules.
	fmt.Fprintf(&b, "add rule inet %s %s ip daddr %s %s\n", Table, chain, c.Pool, reject)
	// A rule for one address (a /32) is honoured whatever that address is: the operator named it.
	// Wider rules come after the guards: loopback and link-local, and whatever the host's routing
	// table says is the host's own — its addresses, broadcast and multicast, including those it
	// gains after this cell was set up — are refused to them.
	rules := dedupRules(c.Rules)
	accept := func(r Rule) {
		fmt.Fprintf(&b, "add rule inet %s %s ip daddr %s %s dport %d ct state new accept\n", Table, chain, r.Prefix, r.Protocol, r.Port)
	}
	for _, r := range rules {
		if r.Prefix.IsSingleIP() {
			accept(r)
		}
	}
	fmt.Fprintf(&b, "add rule inet %s %s ip daddr %s %s\n", Table, chain, guardedSet(), reject)
	fmt.Fprintf(&b, "add rule inet %s %s fib daddr type { local, broadcast, multicast } %s\n", Table, chain, reject)
	for _, r := range rules {
		if !r.Prefix.IsSingleIP() {
			accept(r)
		}
	}
	fmt.Fprintf(&b, "add rule inet %s %s %s\n", Table, chain, reject)
	fmt.Fprintf(&b, "add element inet %s egress { %q : jump %s }\n", Table, c.HostIf, chain)
	if c.Uplink != "" {
		nat := natChain(c.HostIf)
		fmt.Fprintf(&b, "add chain inet %s %s\n", Table, nat)
		fmt.Fprintf(&b, "flush chain inet %s %s\n", Table, nat)
		fmt.Fprintf(&b, "add rule inet %s %s oifname %q masquerade\n", Table, nat, c.Uplink)
		fmt.Fprintf(&b, "add element inet %s egress_nat { %q : jump %s }\n", Table, c.HostIf, nat)
	}
	return b.String()
}

// teardownBatch removes a cell's chains and map entries from the shared table whether or not they
// exist: each object is added (a no-op when present) before it is deleted, so the transaction
// does not fail on a cell that is half set up or already gone (nft 1.0.6, Debian 12's, has no
// `destroy`). It fails when the table itself is missing (see removeRules).
func teardownBatch(hostIf string) string {
	var b strings.Builder
	for _, m := range []struct{ set, chain string }{{"egress", hostIf}, {"egress_nat", natChain(hostIf)}} {
		fmt.Fprintf(&b, "add chain inet %s %s\n", Table, m.chain)
		fmt.Fprintf(&b, "add element inet %s %s { %q : jump %s }\n", Table, m.set, hostIf, m.chain)
		fmt.Fprintf(&b, "delete element inet %s %s { %q }\n", Table, m.set, hostIf)
		fmt.Fprintf(&b, "delete chain inet %s %s\n", Table, m.chain)
	}
	return b.String()
}

// removeRules removes a cell's rules; when no other cell is left it drops the whole table.
func removeRules(nft, hostIf string, others int) error {
	if others == 0 {
		return runNft(nft, dropTableBatch())
	}
	err := runNft(nft, teardownBatch(hostIf))
	if err == nil {
		return nil
	}
	// The batch fails when the table is missing, and then there is nothing to remove.
	ctx, cancel := context.WithTimeout(context.Background(), nftTimeout)
	defer cancel()
	out, lerr := exec.CommandContext(ctx, nft, "list", "table", "inet", Table).CombinedOutput()
	if lerr != nil && bytes.Contains(out, []byte("No such file or directory")) {
		return nil
	}
	return err
}

// dropTableBatch removes the shared table, when the last cell is gone.
func dropTableBatch() string {
	return fmt.Sprintf("add table inet %s\ndelete table inet %s\n", Table, Table)
}

// dedupRules drops repeated rules, keeping the first of each.
func dedupRules(rules []Rule) []Rule {
	out := make([]Rule, 0, len(rules))
	for _, r := range rules {
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out
}
