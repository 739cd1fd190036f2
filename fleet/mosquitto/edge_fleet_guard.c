/*
 * edge_fleet_guard: what mosquitto 2.0's ACL file cannot say about a fleet's identities.
 *
 * Built and loaded by `edge-fleet broker-config` (fleet/broker.py); the ACL file (acl.in)
 * still decides every topic it can. This plugin adds, for certificate clients:
 *
 *   identity   the username is the certificate's common name, whatever the client sent
 *              (set here, so the ACL's %u and `user` lines see the certificate);
 *   client id  a device (any name but the operators') connects only as "<fleet>-<CN>",
 *              so no certificate can take over another device's session; an operator
 *              identity (fleet-controller, fleet-monitor) only with an id beginning
 *              "edge-fleet-", which no device id can have;
 *   $share     only the identities in `share_users` may join a shared subscription
 *              (mosquitto 2.0's ACL file never checks subscriptions, and a message the
 *              round robin hands to a member that may not read it is lost to the group);
 *   retain     a device retains only its own state; only operators retain elsewhere.
 *
 * Options (plugin_opt_*): fleet, operators (space separated), share_users (space
 * separated). Anything it does not decide is deferred to the ACL file.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define NAME_MAX_LEN 128
#define LIST_MAX 1024
#define OPERATOR_PREFIX "edge-fleet-"

static mosquitto_plugin_id_t *plugin_id;
static char fleet[NAME_MAX_LEN + 1];
static char operators[LIST_MAX + 2];   /* " a b " : names padded with spaces */
static char share_users[LIST_MAX + 2];

static bool listed(const char *list, const char *name)
{
	char needle[NAME_MAX_LEN + 3];
	if(!name || strlen(name) > NAME_MAX_LEN || strchr(name, ' ')) return false;
	snprintf(needle, sizeof(needle), " %s ", name);
	return strstr(list, needle) != NULL;
}

static int padded(char *dst, size_t size, const char *value)
{
	if(strlen(value) + 2 >= size) return MOSQ_ERR_INVAL;
	snprintf(dst, size, " %s ", value);
	return MOSQ_ERR_SUCCESS;
}

/* The certificate's common name into `cn`, or false (no certificate, no CN, a CN that is
 * too long or holds a NUL). */
static bool common_name(struct mosquitto *client, char *cn, size_t size)
{
	X509 *cert = mosquitto_client_certificate(client);
	X509_NAME *subject;
	ASN1_STRING *data;
	int i, len;
	bool ok = false;

	if(!cert) return false;
	subject = X509_get_subject_name(cert);
	i = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
	if(i >= 0){
		data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
		len = data ? ASN1_STRING_length(data) : -1;
		if(len > 0 && (size_t)len < size
				&& memchr(ASN1_STRING_get0_data(data), 0, (size_t)len) == NULL){
			memcpy(cn, ASN1_STRING_get0_data(data), (size_t)len);
			cn[len] = '\0';
			ok = true;
		}
	}
	X509_free(cert);
	return ok;
}

static int refuse(struct mosquitto *client, const char *why, const char *cn)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "edge_fleet_guard: refused %s (certificate %s) "
			"from %s: %s", mosquitto_client_id(client) ? mosquitto_client_id(client) : "?",
			cn, mosquitto_client_address(client) ? mosquitto_client_address(client) : "?",
			why);
	return MOSQ_ERR_AUTH;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	char cn[NAME_MAX_LEN + 1], expected[2 * NAME_MAX_LEN + 2];
	const char *id = mosquitto_client_id(ed->client);
	(void)event; (void)userdata;

	if(!common_name(ed->client, cn, sizeof(cn))) return refuse(ed->client, "no usable certificate", "-");
	if(!id) return refuse(ed->client, "no client id", cn);
	if(listed(operators, cn)){
		if(strncmp(id, OPERATOR_PREFIX, strlen(OPERATOR_PREFIX)) != 0){
			return refuse(ed->client, "an operator's client id must begin " OPERATOR_PREFIX, cn);
		}
	}else{
		snprintf(expected, sizeof(expected), "%s-%s", fleet, cn);
		if(strncmp(expected, OPERATOR_PREFIX, strlen(OPERATOR_PREFIX)) == 0){
			return refuse(ed->client, "a device's client id would be an operator's", cn);
		}
		if(strcmp(id, expected) != 0){
			return refuse(ed->client, "a device's client id must be <fleet>-<its certificate name>", cn);
		}
	}
	if(mosquitto_set_username(ed->client, cn) != MOSQ_ERR_SUCCESS){
		return refuse(ed->client, "cannot set the username", cn);
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);
	char own_state[3 * NAME_MAX_LEN];
	(void)event; (void)userdata;

	if(!user) return MOSQ_ERR_ACL_DENIED;
	if((ed->access == MOSQ_ACL_SUBSCRIBE || ed->access == MOSQ_ACL_UNSUBSCRIBE)
			&& strncmp(ed->topic, "$share/", 7) == 0 && !listed(share_users, user)){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_WRITE && ed->retain && !listed(operators, user)){
		snprintf(own_state, sizeof(own_state), "edge/v1/%s/%s/state", fleet, user);
		if(strcmp(ed->topic, own_state) != 0) return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	int rc;
	(void)user_data;

	plugin_id = identifier;
	fleet[0] = '\0';
	strcpy(operators, " ");
	strcpy(share_users, " ");
	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "fleet")){
			if(strlen(opts[i].value) > NAME_MAX_LEN) return MOSQ_ERR_INVAL;
			strcpy(fleet, opts[i].value);
		}else if(!strcmp(opts[i].key, "operators")){
			if(padded(operators, sizeof(operators), opts[i].value)) return MOSQ_ERR_INVAL;
		}else if(!strcmp(opts[i].key, "share_users")){
			if(padded(share_users, sizeof(share_users), opts[i].value)) return MOSQ_ERR_INVAL;
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "edge_fleet_guard: unknown option %s", opts[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	if(!fleet[0]){
		mosquitto_log_printf(MOSQ_LOG_ERR, "edge_fleet_guard: plugin_opt_fleet is required");
		return MOSQ_ERR_INVAL;
	}
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc) return rc;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data; (void)opts; (void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	return MOSQ_ERR_SUCCESS;
}
